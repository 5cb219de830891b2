#include "broker/common/config/toml_document.h"

#include <toml++/toml.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/string_view.h"

namespace mandate::config {
namespace {

// This Abseil build has its own string_view type, so std::string_view is bridged explicitly.
absl::string_view AbslView(std::string_view text) { return {text.data(), text.size()}; }

SourcePosition PositionOf(const toml::source_region& region) {
  return {static_cast<int64_t>(region.begin.line), static_cast<int64_t>(region.begin.column)};
}

}  // namespace

// Copies toml++'s tree into ours, so no caller needs the parser's types.
struct TomlBuilder {
  static TomlValue Build(const toml::node& node) {
    TomlValue out;
    out.position_ = PositionOf(node.source());
    switch (node.type()) {
      case toml::node_type::table:
        out.type_ = TomlValue::Type::kTable;
        for (const auto& [key, child] : *node.as_table()) {
          out.table_.push_back({std::string(key.str()), PositionOf(key.source()), Build(child)});
        }
        break;
      case toml::node_type::array:
        out.type_ = TomlValue::Type::kArray;
        for (const toml::node& element : *node.as_array()) out.array_.push_back(Build(element));
        break;
      case toml::node_type::string:
        out.type_ = TomlValue::Type::kString;
        out.string_ = node.as_string()->get();
        break;
      case toml::node_type::integer:
        out.type_ = TomlValue::Type::kInteger;
        out.integer_ = node.as_integer()->get();
        break;
      case toml::node_type::floating_point:
        out.type_ = TomlValue::Type::kFloat;
        out.floating_ = node.as_floating_point()->get();
        break;
      case toml::node_type::boolean:
        out.type_ = TomlValue::Type::kBoolean;
        out.boolean_ = node.as_boolean()->get();
        break;
      default:  // date, time, date_time (and none, which a parsed tree never holds)
        out.type_ = TomlValue::Type::kDateTime;
        break;
    }
    return out;
  }
};

const TomlMember* TomlValue::Find(std::string_view key) const {
  for (const TomlMember& member : table_) {
    if (member.key == key) return &member;
  }
  return nullptr;
}

std::string_view TomlValue::TypeName(Type type) {
  switch (type) {
    case Type::kTable:
      return "a table";
    case Type::kArray:
      return "an array";
    case Type::kString:
      return "a string";
    case Type::kInteger:
      return "an integer";
    case Type::kFloat:
      return "a float";
    case Type::kBoolean:
      return "a boolean";
    case Type::kDateTime:
      return "a date/time";
  }
  return "a value";
}

absl::StatusOr<TomlDocument> TomlDocument::ParseFile(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    int err = errno;
    std::string message = absl::StrCat(path, ": cannot open: ", std::strerror(err));
    if (err == ENOENT) return absl::NotFoundError(message);
    if (err == EACCES) return absl::PermissionDeniedError(message);
    return absl::FailedPreconditionError(message);
  }
  std::ostringstream text;
  text << in.rdbuf();
  if (in.bad()) return absl::FailedPreconditionError(absl::StrCat(path, ": read failed"));
  return ParseText(text.str(), path);
}

absl::StatusOr<TomlDocument> TomlDocument::ParseText(std::string_view text,
                                                     std::string source_name) {
  try {
    toml::table table = toml::parse(text, source_name);
    auto root = std::make_unique<TomlValue>(TomlBuilder::Build(table));
    root->position_ = {1, 1};
    return TomlDocument(std::move(source_name), std::move(root));
  } catch (const toml::parse_error& e) {
    TomlDocument none(source_name, std::make_unique<TomlValue>());
    return none.ErrorAt(PositionOf(e.source()), "", e.description());
  }
}

absl::Status TomlDocument::ErrorAt(SourcePosition position, std::string_view key_path,
                                   std::string_view message) const {
  std::string where = absl::StrCat(source_name_, ":", position.line, ":", position.column, ": ");
  if (!key_path.empty()) absl::StrAppend(&where, AbslView(key_path), ": ");
  return absl::InvalidArgumentError(absl::StrCat(where, AbslView(message)));
}

TomlTableReader::TomlTableReader(const TomlDocument& document, const TomlValue& table,
                                 std::string key_path)
    : document_(document), table_(table), key_path_(std::move(key_path)) {}

const TomlValue* TomlTableReader::Find(std::string_view key) {
  known_.emplace(key);
  const TomlMember* member = table_.Find(key);
  return member == nullptr ? nullptr : &member->value;
}

std::string TomlTableReader::PathOf(std::string_view key) const {
  if (key_path_.empty()) return std::string(key);
  return absl::StrCat(key_path_, ".", AbslView(key));
}

std::string TomlTableReader::PathOf(std::string_view key, size_t index) const {
  return absl::StrCat(PathOf(key), "[", index + 1, "]");
}

absl::Status TomlTableReader::Error(std::string_view key, std::string_view message) const {
  const TomlMember* member = table_.Find(key);
  SourcePosition at = member == nullptr ? table_.position() : member->value.position();
  return document_.ErrorAt(at, PathOf(key), message);
}

absl::Status TomlTableReader::WrongType(std::string_view key, std::string_view expected) const {
  const TomlMember* member = table_.Find(key);
  std::string_view got = member == nullptr ? "absent" : TomlValue::TypeName(member->value.type());
  return Error(key, absl::StrCat("must be ", AbslView(expected), ", not ", AbslView(got)));
}

absl::StatusOr<std::optional<std::string>> TomlTableReader::String(std::string_view key) {
  const TomlValue* value = Find(key);
  if (value == nullptr) return std::nullopt;
  if (value->type() != TomlValue::Type::kString) return WrongType(key, "a string");
  return value->string();
}

absl::StatusOr<std::optional<int64_t>> TomlTableReader::Integer(std::string_view key) {
  const TomlValue* value = Find(key);
  if (value == nullptr) return std::nullopt;
  if (value->type() != TomlValue::Type::kInteger) return WrongType(key, "an integer");
  return value->integer();
}

absl::StatusOr<std::optional<bool>> TomlTableReader::Boolean(std::string_view key) {
  const TomlValue* value = Find(key);
  if (value == nullptr) return std::nullopt;
  if (value->type() != TomlValue::Type::kBoolean) return WrongType(key, "true or false");
  return value->boolean();
}

absl::StatusOr<std::optional<std::vector<TomlString>>> TomlTableReader::StringArray(
    std::string_view key) {
  const TomlValue* value = Find(key);
  if (value == nullptr) return std::nullopt;
  if (value->type() != TomlValue::Type::kArray) return WrongType(key, "an array of strings");
  std::vector<TomlString> out;
  for (size_t i = 0; i < value->array().size(); ++i) {
    const TomlValue& element = value->array()[i];
    if (element.type() != TomlValue::Type::kString) {
      return document_.ErrorAt(
          element.position(), PathOf(key, i),
          absl::StrCat("must be a string, not ", AbslView(TomlValue::TypeName(element.type()))));
    }
    out.push_back({element.string(), element.position()});
  }
  return out;
}

absl::StatusOr<const TomlValue*> TomlTableReader::Table(std::string_view key) {
  const TomlValue* value = Find(key);
  if (value == nullptr) return nullptr;
  if (value->type() != TomlValue::Type::kTable) return WrongType(key, "a table");
  return value;
}

absl::StatusOr<std::optional<std::vector<const TomlValue*>>> TomlTableReader::TableArray(
    std::string_view key) {
  const TomlValue* value = Find(key);
  if (value == nullptr) return std::nullopt;
  if (value->type() != TomlValue::Type::kArray) {
    return WrongType(key, "an array of tables");
  }
  std::vector<const TomlValue*> out;
  for (size_t i = 0; i < value->array().size(); ++i) {
    const TomlValue& element = value->array()[i];
    if (element.type() != TomlValue::Type::kTable) {
      return document_.ErrorAt(
          element.position(), PathOf(key, i),
          absl::StrCat("must be a table, not ", AbslView(TomlValue::TypeName(element.type()))));
    }
    out.push_back(&element);
  }
  return out;
}

absl::Status TomlTableReader::CheckNoUnknownKeys() const {
  const std::string* first = nullptr;
  SourcePosition first_at;
  for (const TomlMember& member : table_.table()) {
    if (known_.contains(member.key)) continue;
    const SourcePosition at = member.key_position;
    if (first == nullptr ||
        std::pair(at.line, at.column) < std::pair(first_at.line, first_at.column)) {
      first = &member.key;
      first_at = at;
    }
  }
  if (first == nullptr) return absl::OkStatus();
  return document_.ErrorAt(first_at, PathOf(*first), "unknown key");
}

}  // namespace mandate::config
