#include "broker/common/config/config_file.h"

#include <toml++/toml.h>

#include <sstream>

#include "absl/strings/str_cat.h"

namespace mandate::config {

ConfigFile::ConfigFile(std::string path, std::unique_ptr<toml::table> table)
    : path_(std::move(path)), table_(std::move(table)) {}
ConfigFile::ConfigFile(ConfigFile&&) noexcept = default;
ConfigFile& ConfigFile::operator=(ConfigFile&&) noexcept = default;
ConfigFile::~ConfigFile() = default;

absl::StatusOr<ConfigFile> ConfigFile::Load(const std::string& path) {
  try {
    auto table = std::make_unique<toml::table>(toml::parse_file(path));
    return ConfigFile(path, std::move(table));
  } catch (const toml::parse_error& e) {
    std::ostringstream where;
    where << e.source().begin;
    return absl::InvalidArgumentError(
        absl::StrCat("config ", path, ": ", std::string(e.description()), " at ", where.str()));
  }
}

absl::Status ConfigFile::GetString(const std::string& key, bool flag_given, std::string& out) {
  known_.insert(key);
  const toml::node* node = table_->get(key);
  if (node == nullptr) return absl::OkStatus();
  auto value = node->value<std::string>();
  if (!value || !node->is_string()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config ", path_, ": '", key, "' must be a string"));
  }
  if (!flag_given) out = *value;
  return absl::OkStatus();
}

absl::Status ConfigFile::GetInt(const std::string& key, bool flag_given, int64_t& out) {
  known_.insert(key);
  const toml::node* node = table_->get(key);
  if (node == nullptr) return absl::OkStatus();
  if (!node->is_integer()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config ", path_, ": '", key, "' must be an integer"));
  }
  if (!flag_given) out = *node->value<int64_t>();
  return absl::OkStatus();
}

absl::Status ConfigFile::GetBool(const std::string& key, bool flag_given, bool& out) {
  known_.insert(key);
  const toml::node* node = table_->get(key);
  if (node == nullptr) return absl::OkStatus();
  if (!node->is_boolean()) {
    return absl::InvalidArgumentError(
        absl::StrCat("config ", path_, ": '", key, "' must be true or false"));
  }
  if (!flag_given) out = *node->value<bool>();
  return absl::OkStatus();
}

absl::Status ConfigFile::GetStringList(const std::string& key, bool flag_given,
                                       std::vector<std::string>& out) {
  known_.insert(key);
  const toml::node* node = table_->get(key);
  if (node == nullptr) return absl::OkStatus();
  const toml::array* array = node->as_array();
  std::vector<std::string> values;
  bool ok = array != nullptr;
  if (ok) {
    for (const toml::node& element : *array) {
      auto value = element.value<std::string>();
      if (!value || !element.is_string()) {
        ok = false;
        break;
      }
      values.push_back(*value);
    }
  }
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("config ", path_, ": '", key, "' must be an array of strings"));
  }
  if (!flag_given) out = std::move(values);
  return absl::OkStatus();
}

absl::Status ConfigFile::CheckAllKeysKnown() const {
  for (const auto& [key, node] : *table_) {
    std::string name(key.str());
    if (!known_.contains(name)) {
      return absl::InvalidArgumentError(
          absl::StrCat("config ", path_, ": unknown key '", name, "'"));
    }
  }
  return absl::OkStatus();
}

}  // namespace mandate::config
