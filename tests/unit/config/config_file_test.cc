#include "broker/common/config/config_file.h"

#include <gtest/gtest.h>
#include <stdlib.h>

#include <filesystem>
#include <fstream>

namespace mandate::config {
namespace {

class ConfigFileTest : public ::testing::Test {
 protected:
  void SetUp() override {
    std::string pattern = (std::filesystem::temp_directory_path() / "mandate-cfg-XXXXXX").string();
    dir_ = ::mkdtemp(pattern.data());
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Write(const std::string& text) {
    std::string path = dir_ + "/c.toml";
    std::ofstream(path) << text;
    return path;
  }
  std::string dir_;
};

TEST_F(ConfigFileTest, ValuesApplyUnlessTheFlagWasGiven) {
  auto file = ConfigFile::Load(Write("name = \"a\"\ncount = 7\non = true\n"));
  ASSERT_TRUE(file.ok()) << file.status();
  std::string name = "default";
  int64_t count = 1;
  bool on = false;
  ASSERT_TRUE(file->GetString("name", false, name).ok());
  ASSERT_TRUE(file->GetInt("count", true, count).ok());  // flag given: keep it
  ASSERT_TRUE(file->GetBool("on", false, on).ok());
  EXPECT_EQ(name, "a");
  EXPECT_EQ(count, 1);
  EXPECT_TRUE(on);
  EXPECT_TRUE(file->CheckAllKeysKnown().ok());
}

TEST_F(ConfigFileTest, StringListsReadArraysOnly) {
  auto file =
      ConfigFile::Load(Write("cas = [\"a.pem\", \"b.pem\"]\nbad = [\"x\", 1]\none = \"c\"\n"));
  ASSERT_TRUE(file.ok());
  std::vector<std::string> cas, bad, one;
  ASSERT_TRUE(file->GetStringList("cas", false, cas).ok());
  EXPECT_EQ(cas, (std::vector<std::string>{"a.pem", "b.pem"}));
  EXPECT_EQ(file->GetStringList("bad", false, bad).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(file->GetStringList("one", false, one).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ConfigFileTest, AbsentKeysLeaveDefaults) {
  auto file = ConfigFile::Load(Write(""));
  ASSERT_TRUE(file.ok());
  std::string name = "default";
  ASSERT_TRUE(file->GetString("name", false, name).ok());
  EXPECT_EQ(name, "default");
}

TEST_F(ConfigFileTest, WrongTypesAreErrorsNamingTheKey) {
  auto file = ConfigFile::Load(Write("trust_domain = 5\nttl = \"60\"\nflag = 1\n"));
  ASSERT_TRUE(file.ok());
  std::string s;
  int64_t i = 0;
  bool b = false;
  auto status = file->GetString("trust_domain", false, s);
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("'trust_domain' must be a string"), std::string::npos);
  EXPECT_EQ(file->GetInt("ttl", false, i).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(file->GetBool("flag", false, b).code(), absl::StatusCode::kInvalidArgument);
}

TEST_F(ConfigFileTest, UnknownKeysAreErrors) {
  auto file = ConfigFile::Load(Write("trust_domian = \"example.org\"\n"));
  ASSERT_TRUE(file.ok());
  std::string td;
  ASSERT_TRUE(file->GetString("trust_domain", false, td).ok());
  auto status = file->CheckAllKeysKnown();
  EXPECT_EQ(status.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(status.message().find("unknown key 'trust_domian'"), std::string::npos);
}

TEST_F(ConfigFileTest, MalformedTomlIsAnErrorNotAnException) {
  auto file = ConfigFile::Load(Write("trust_domain = \"\n"));
  EXPECT_EQ(file.status().code(), absl::StatusCode::kInvalidArgument);
  auto missing = ConfigFile::Load(dir_ + "/nope.toml");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace mandate::config
