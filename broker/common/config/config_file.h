// A daemon's TOML config file, applied under its command-line flags: keys are the flag names
// with '_' for '-', and a flag given on the command line wins. Unknown keys and values of the
// wrong type are errors (a typo must not silently fall back to a default).
#ifndef MANDATE_BROKER_COMMON_CONFIG_CONFIG_FILE_H_
#define MANDATE_BROKER_COMMON_CONFIG_CONFIG_FILE_H_

#include <cstdint>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace toml {
inline namespace v3 {
class table;
}
}  // namespace toml

namespace mandate::config {

class ConfigFile {
 public:
  // Parses `path`; InvalidArgument with the parser's message and position on bad TOML.
  static absl::StatusOr<ConfigFile> Load(const std::string& path);
  ConfigFile(ConfigFile&&) noexcept;
  ConfigFile& operator=(ConfigFile&&) noexcept;
  ~ConfigFile();

  // Each setter leaves `out` alone when the key is absent or `flag_given` is true, and fails
  // with InvalidArgument naming the key when the value has the wrong type.
  absl::Status GetString(const std::string& key, bool flag_given, std::string& out);
  absl::Status GetInt(const std::string& key, bool flag_given, int64_t& out);
  absl::Status GetBool(const std::string& key, bool flag_given, bool& out);
  // An array of strings (for repeatable flags).
  absl::Status GetStringList(const std::string& key, bool flag_given,
                             std::vector<std::string>& out);
  // InvalidArgument naming the first key no getter asked for.
  absl::Status CheckAllKeysKnown() const;

 private:
  ConfigFile(std::string path, std::unique_ptr<toml::table> table);
  std::string path_;
  std::unique_ptr<toml::table> table_;
  std::set<std::string> known_;
};

}  // namespace mandate::config

#endif  // MANDATE_BROKER_COMMON_CONFIG_CONFIG_FILE_H_
