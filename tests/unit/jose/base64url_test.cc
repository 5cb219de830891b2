#include <ostream>
#include <random>
#include <string>
#include <string_view>

#include "broker/common/jose/jose.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::jose {
namespace {

using ::testing::HasSubstr;

TEST(Base64UrlTest, EncodeMatchesRfc4648VectorsWithoutPadding) {
  EXPECT_EQ(Base64UrlEncode(""), "");
  EXPECT_EQ(Base64UrlEncode("f"), "Zg");
  EXPECT_EQ(Base64UrlEncode("fo"), "Zm8");
  EXPECT_EQ(Base64UrlEncode("foo"), "Zm9v");
  EXPECT_EQ(Base64UrlEncode("foob"), "Zm9vYg");
  EXPECT_EQ(Base64UrlEncode("fooba"), "Zm9vYmE");
  EXPECT_EQ(Base64UrlEncode("foobar"), "Zm9vYmFy");
}

TEST(Base64UrlTest, EncodeUsesUrlSafeAlphabet) {
  // 0xfb 0xff is "+/8=" in standard base64.
  EXPECT_EQ(Base64UrlEncode(std::string("\xfb\xff", 2)), "-_8");
  auto decoded = Base64UrlDecode("-_8");
  ASSERT_TRUE(decoded.ok()) << decoded.status();
  EXPECT_EQ(*decoded, std::string("\xfb\xff", 2));
}

TEST(Base64UrlTest, RoundTripsEveryLengthAndByteValue) {
  std::mt19937 rng(7);
  for (size_t len = 0; len <= 70; ++len) {
    std::string bytes(len, '\0');
    for (char& c : bytes) c = static_cast<char>(rng() & 0xff);
    auto decoded = Base64UrlDecode(Base64UrlEncode(bytes));
    ASSERT_TRUE(decoded.ok()) << "len " << len << ": " << decoded.status();
    EXPECT_EQ(*decoded, bytes) << "len " << len;
  }
  std::string all;
  for (int i = 0; i < 256; ++i) all.push_back(static_cast<char>(i));
  auto decoded = Base64UrlDecode(Base64UrlEncode(all));
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(*decoded, all);
}

TEST(Base64UrlTest, DecodesEmptyString) {
  auto decoded = Base64UrlDecode("");
  ASSERT_TRUE(decoded.ok());
  EXPECT_EQ(*decoded, "");
}

struct RejectCase {
  std::string name;  // test name suffix
  std::string input;
  std::string expected_error;  // substring of the error message
};

void PrintTo(const RejectCase& c, std::ostream* os) { *os << c.name; }

class Base64UrlRejectTest : public ::testing::TestWithParam<RejectCase> {};

TEST_P(Base64UrlRejectTest, DecodeRejects) {
  auto decoded = Base64UrlDecode(GetParam().input);
  ASSERT_FALSE(decoded.ok()) << "accepted '" << GetParam().input << "'";
  EXPECT_EQ(decoded.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(decoded.status().message(), HasSubstr(GetParam().expected_error));
}

INSTANTIATE_TEST_SUITE_P(
    StrictnessTable, Base64UrlRejectTest,
    ::testing::Values(
        // Padding, in any amount.
        RejectCase{"PaddingTwo", "Zg==", "padded"}, RejectCase{"PaddingOne", "Zm8=", "padded"},
        RejectCase{"PaddingFour", "Zm9v====", "padded"},
        // The standard alphabet's '+' and '/'.
        RejectCase{"StandardPlus", "+_8", "invalid base64url character"},
        RejectCase{"StandardSlash", "-/8", "invalid base64url character"},
        // Whitespace anywhere.
        RejectCase{"InnerSpace", "Zm9v YmFy", "invalid base64url character"},
        RejectCase{"TrailingNewline", "Zm9vYmFy\n", "invalid base64url character"},
        RejectCase{"LeadingTab", "\tZm9v", "invalid base64url character"},
        RejectCase{"InnerCrLf", "Zm9v\r\nYmFy", "invalid base64url character"},
        // Other bytes: NUL, '.', non-ASCII.
        RejectCase{"Nul", std::string("Zm\0v", 4), "invalid base64url character"},
        RejectCase{"Dot", "Zm.v", "invalid base64url character"},
        RejectCase{"NonAscii", "Zm\xc3\xa9", "invalid base64url character"},
        // A length of 1 (mod 4) cannot come from any byte string.
        RejectCase{"LengthOne", "Z", "length % 4 == 1"},
        RejectCase{"LengthFive", "Zm9vY", "length % 4 == 1"},
        // Non-canonical: the unused low bits of the last character are not zero. "Zg" is 'f';
        // "Zh".."Zv" would decode to 'f' too if the trailing bits were ignored.
        RejectCase{"TrailingBitsZh", "Zh", "non-canonical"},
        RejectCase{"TrailingBitsZv", "Zv", "non-canonical"},
        RejectCase{"TrailingBitsZm9", "Zm9", "non-canonical"},  // "Zm8" is "fo"
        RejectCase{"TrailingBitsZmDash", "Zm-", "non-canonical"}),
    [](const ::testing::TestParamInfo<RejectCase>& info) { return info.param.name; });

TEST(Base64UrlTest, CanonicalNeighboursOfRejectedInputsDecode) {
  // The accepted counterparts of the non-canonical cases above.
  EXPECT_EQ(*Base64UrlDecode("Zg"), "f");
  EXPECT_EQ(*Base64UrlDecode("Zm8"), "fo");
}

TEST(Base64UrlTest, ErrorNamesTheOffendingOffset) {
  auto decoded = Base64UrlDecode("Zm9v+mFy");
  ASSERT_FALSE(decoded.ok());
  EXPECT_THAT(decoded.status().message(), HasSubstr("'+' at offset 4"));
}

}  // namespace
}  // namespace mandate::jose
