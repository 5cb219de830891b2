// A parsed TOML document as a plain tree with source positions, for files whose structure is
// richer than ConfigFile's flat keys (the policy rules file). This module is the only user of
// toml++: the tree below is our own, so callers never include the parser.
//
// TomlTableReader walks one table the way a strict loader should: every key it is asked for is
// marked known, wrong types are errors naming the key, and CheckNoUnknownKeys() refuses anything
// left over (a typo must not silently mean "not set"). Every error has the form
//   "<source>:<line>:<column>: <key path>: <what is wrong>"
// where the key path names the value from the document root ("rule[3].time_window.start").
//
// Thread-safety: immutable after parsing; concurrent readers are fine. A reader is not.
#ifndef MANDATE_BROKER_COMMON_CONFIG_TOML_DOCUMENT_H_
#define MANDATE_BROKER_COMMON_CONFIG_TOML_DOCUMENT_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <set>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace mandate::config {

// 1-based line and column in the source; 0 when unknown.
struct SourcePosition {
  int64_t line = 0;
  int64_t column = 0;
};

struct TomlMember;

class TomlValue {
 public:
  enum class Type { kTable, kArray, kString, kInteger, kFloat, kBoolean, kDateTime };

  Type type() const { return type_; }
  // The position of the value (for a table: its header or its first key).
  SourcePosition position() const { return position_; }
  // "a table", "an array", "a string", ... for error messages.
  static std::string_view TypeName(Type type);

  // Each accessor is valid only for its type (callers test type() first); they return
  // defaults for any other type rather than failing.
  const std::string& string() const { return string_; }
  int64_t integer() const { return integer_; }
  double floating() const { return floating_; }
  bool boolean() const { return boolean_; }
  const std::vector<TomlValue>& array() const { return array_; }
  // A table's members, ordered by key. Each key's own position is kept too (where an unknown
  // key is reported).
  const std::vector<TomlMember>& table() const { return table_; }
  // The member `key` of a table; nullptr when absent (or not a table).
  const TomlMember* Find(std::string_view key) const;

 private:
  friend class TomlDocument;
  friend struct TomlBuilder;
  Type type_ = Type::kTable;
  SourcePosition position_;
  std::string string_;
  int64_t integer_ = 0;
  double floating_ = 0;
  bool boolean_ = false;
  std::vector<TomlValue> array_;
  std::vector<TomlMember> table_;
};

struct TomlMember {
  std::string key;
  SourcePosition key_position;
  TomlValue value;
};

class TomlDocument {
 public:
  // Parses the file at `path`. InvalidArgument "<path>:<line>:<col>: <parser message>" on bad
  // TOML; NotFound/PermissionDenied/... (naming the path) when it cannot be read.
  static absl::StatusOr<TomlDocument> ParseFile(const std::string& path);
  // Parses `text`; `source_name` stands for the path in messages.
  static absl::StatusOr<TomlDocument> ParseText(std::string_view text, std::string source_name);

  const std::string& source_name() const { return source_name_; }
  const TomlValue& root() const { return *root_; }

  // InvalidArgument "<source>:<line>:<col>: <key_path>: <message>" (no key path part when
  // `key_path` is empty): for the caller's own semantic checks (a bad glob, an unknown name).
  absl::Status ErrorAt(SourcePosition position, std::string_view key_path,
                       std::string_view message) const;

 private:
  TomlDocument(std::string source_name, std::unique_ptr<TomlValue> root)
      : source_name_(std::move(source_name)), root_(std::move(root)) {}
  std::string source_name_;
  std::unique_ptr<TomlValue> root_;  // never null; a table
};

// A string with the position it came from (an element of a string array).
struct TomlString {
  std::string value;
  SourcePosition position;
};

// Reads the members of one table of `document` (which must outlive the reader). `key_path` is
// the table's path from the root ("" for the root, "rule[2]" for the second [[rule]]).
class TomlTableReader {
 public:
  TomlTableReader(const TomlDocument& document, const TomlValue& table, std::string key_path);

  // The member `key`, marked known; nullptr when absent.
  const TomlValue* Find(std::string_view key);

  // Typed getters: nullopt when absent, an error naming the key when the type is wrong.
  absl::StatusOr<std::optional<std::string>> String(std::string_view key);
  absl::StatusOr<std::optional<int64_t>> Integer(std::string_view key);
  absl::StatusOr<std::optional<bool>> Boolean(std::string_view key);
  // An array whose elements are all strings (an empty array is fine).
  absl::StatusOr<std::optional<std::vector<TomlString>>> StringArray(std::string_view key);
  // A table (a [section] or an inline table).
  absl::StatusOr<const TomlValue*> Table(std::string_view key);
  // An array of tables ([[key]] sections or an array of inline tables).
  absl::StatusOr<std::optional<std::vector<const TomlValue*>>> TableArray(std::string_view key);

  // The path of member `key` ("rule[2].ttl_max"), and of element `index` (0-based) of array
  // member `key`, written 1-based as people count ("rule[2]").
  std::string PathOf(std::string_view key) const;
  std::string PathOf(std::string_view key, size_t index) const;

  // ErrorAt for member `key` (at its value's position).
  absl::Status Error(std::string_view key, std::string_view message) const;

  // InvalidArgument naming the first member (in file order) no getter asked for.
  absl::Status CheckNoUnknownKeys() const;

 private:
  absl::Status WrongType(std::string_view key, std::string_view expected) const;

  const TomlDocument& document_;
  const TomlValue& table_;
  std::string key_path_;
  std::set<std::string, std::less<>> known_;
};

}  // namespace mandate::config

#endif  // MANDATE_BROKER_COMMON_CONFIG_TOML_DOCUMENT_H_
