#include "broker/common/config/toml_document.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

namespace mandate::config {
namespace {

TomlDocument Parse(const std::string& text) {
  absl::StatusOr<TomlDocument> document = TomlDocument::ParseText(text, "t.toml");
  EXPECT_TRUE(document.ok()) << document.status();
  return std::move(document).value();
}

TEST(TomlDocumentTest, KeepsValuesTypesAndPositions) {
  TomlDocument document = Parse(
      "a = \"x\"\n\n[t]\nn = 7\nb = true\nf = 1.5\nd = 1979-05-27\n"
      "list = [\"p\", \"q\"]\n[[arr]]\nk = 1\n[[arr]]\nk = 2\n");
  TomlTableReader top(document, document.root(), "");
  EXPECT_EQ(*top.String("a"), "x");
  absl::StatusOr<const TomlValue*> t = top.Table("t");
  ASSERT_TRUE(t.ok() && *t != nullptr);
  EXPECT_EQ((*t)->position().line, 3);
  TomlTableReader inner(document, **t, "t");
  EXPECT_EQ(*inner.Integer("n"), 7);
  EXPECT_EQ(*inner.Boolean("b"), true);
  EXPECT_EQ(inner.Find("f")->type(), TomlValue::Type::kFloat);
  EXPECT_EQ(inner.Find("d")->type(), TomlValue::Type::kDateTime);
  auto list = inner.StringArray("list");
  ASSERT_TRUE(list.ok() && list->has_value());
  ASSERT_EQ((*list)->size(), 2u);
  EXPECT_EQ((**list)[1].value, "q");
  EXPECT_EQ((**list)[1].position.line, 8);
  EXPECT_TRUE(inner.CheckNoUnknownKeys().ok());
  auto arr = top.TableArray("arr");
  ASSERT_TRUE(arr.ok() && arr->has_value());
  ASSERT_EQ((*arr)->size(), 2u);
  EXPECT_EQ((**arr)[1]->position().line, 11);
  EXPECT_EQ(top.PathOf("arr", 1), "arr[2]");
  EXPECT_TRUE(top.CheckNoUnknownKeys().ok());
  // Absent keys are nullopt / nullptr, not errors.
  EXPECT_FALSE(top.String("missing")->has_value());
  EXPECT_EQ(*top.Table("missing2"), nullptr);
}

TEST(TomlDocumentTest, WrongTypesNameKeyAndPosition) {
  TomlDocument document = Parse("[s]\nport = \"80\"\nnames = [\"a\", 2]\n");
  TomlTableReader top(document, document.root(), "");
  TomlTableReader s(document, **top.Table("s"), "s");
  absl::Status port = s.Integer("port").status();
  EXPECT_EQ(port.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(port.message(), "t.toml:2:8: s.port: must be an integer, not a string");
  absl::Status names = s.StringArray("names").status();
  EXPECT_EQ(names.message(), "t.toml:3:15: s.names[2]: must be a string, not an integer");
  EXPECT_EQ(top.TableArray("s").status().message(),
            "t.toml:1:1: s: must be an array of tables, not a table");
}

TEST(TomlDocumentTest, FirstUnknownKeyInFileOrderIsNamed) {
  TomlDocument document = Parse("zeta = 1\nknown = 2\nalpha = 3\n");
  TomlTableReader top(document, document.root(), "");
  ASSERT_TRUE(top.Integer("known").ok());
  EXPECT_EQ(top.CheckNoUnknownKeys().message(), "t.toml:1:1: zeta: unknown key");
  ASSERT_TRUE(top.Integer("zeta").ok());
  EXPECT_EQ(top.CheckNoUnknownKeys().message(), "t.toml:3:1: alpha: unknown key");
}

TEST(TomlDocumentTest, SyntaxErrorsAndUnreadableFiles) {
  absl::StatusOr<TomlDocument> bad = TomlDocument::ParseText("a = \n", "t.toml");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(bad.status().message().rfind("t.toml:1:", 0), 0u) << bad.status();
  absl::StatusOr<TomlDocument> duplicate = TomlDocument::ParseText("a = 1\na = 2\n", "t.toml");
  EXPECT_EQ(duplicate.status().message().rfind("t.toml:2:", 0), 0u) << duplicate.status();

  std::string pattern = (std::filesystem::temp_directory_path() / "mandate-toml-XXXXXX").string();
  ASSERT_NE(::mkdtemp(pattern.data()), nullptr);
  EXPECT_EQ(TomlDocument::ParseFile(pattern + "/absent.toml").status().code(),
            absl::StatusCode::kNotFound);
  std::ofstream(pattern + "/ok.toml") << "k = \"v\"\n";
  absl::StatusOr<TomlDocument> file = TomlDocument::ParseFile(pattern + "/ok.toml");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ(file->source_name(), pattern + "/ok.toml");
  std::filesystem::remove_all(pattern);
}

}  // namespace
}  // namespace mandate::config
