#include "broker/common/crypto/x509.h"

#include <openssl/evp.h>
#include <openssl/pem.h>
#include <openssl/x509.h>
#include <openssl/x509v3.h>
#include <stdio.h>
#include <stdlib.h>

#include <array>
#include <ctime>
#include <filesystem>
#include <fstream>
#include <set>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/match.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace mandate::crypto {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;

constexpr char kTrustDomain[] = "spiffe://example.org";
constexpr char kWorkloadId[] = "spiffe://example.org/ns/prod/web";

PrivateKey NewKey() {
  auto key = PrivateKey::GenerateP256();
  EXPECT_TRUE(key.ok()) << key.status();
  return std::move(key).value();
}

// A key of any OpenSSL-supported kind, brought in through PEM as a caller would.
PrivateKey KeyOfKind(const char* type, size_t rsa_bits = 0) {
  EVP_PKEY* raw = rsa_bits != 0 ? EVP_PKEY_Q_keygen(nullptr, nullptr, type, rsa_bits)
                                : EVP_PKEY_Q_keygen(nullptr, nullptr, type);
  EXPECT_NE(raw, nullptr);
  BIO* bio = BIO_new(BIO_s_mem());
  PEM_write_bio_PrivateKey(bio, raw, nullptr, nullptr, 0, nullptr, nullptr);
  char* data = nullptr;
  long len = BIO_get_mem_data(bio, &data);
  auto key = PrivateKey::FromPem(std::string(data, static_cast<size_t>(len)));
  BIO_free(bio);
  EVP_PKEY_free(raw);
  EXPECT_TRUE(key.ok()) << key.status();
  return std::move(key).value();
}

std::string RunCommand(const std::string& command) {
  std::string output;
  FILE* pipe = ::popen((command + " 2>&1").c_str(), "r");
  if (pipe == nullptr) return "popen failed";
  std::array<char, 4096> buf;
  size_t n;
  while ((n = fread(buf.data(), 1, buf.size(), pipe)) > 0) output.append(buf.data(), n);
  ::pclose(pipe);
  return output;
}

bool ExtensionIsCritical(const Certificate& cert, int nid) {
  int index = X509_get_ext_by_NID(cert.x509(), nid, -1);
  return index >= 0 && X509_EXTENSION_get_critical(X509_get_ext(cert.x509(), index)) == 1;
}

class X509Test : public ::testing::Test {
 protected:
  void SetUp() override {
    now_ = static_cast<int64_t>(std::time(nullptr));
    auto ca = CreateSelfSignedCa(ca_key_, CaOptions{.trust_domain_id = kTrustDomain,
                                                    .not_before = now_ - 3600,
                                                    .not_after = now_ + 30 * 86400});
    ASSERT_TRUE(ca.ok()) << ca.status();
    ca_.emplace_back(*ca);
  }

  const Certificate& ca() const { return ca_[0]; }

  LeafOptions Leaf(std::string id = kWorkloadId) const {
    LeafOptions options;
    options.spiffe_id = std::move(id);
    options.not_before = now_ - 60;
    options.not_after = now_ + 3600;
    return options;
  }

  Certificate IssueLeaf(const LeafOptions& options) {
    auto leaf = SignLeaf(ca(), ca_key_, leaf_key_.public_key(), options);
    EXPECT_TRUE(leaf.ok()) << leaf.status();
    return std::move(leaf).value();
  }

  // Builds a certificate the way a buggy or hostile issuer might, with extensions given in
  // OpenSSL config syntax. `issuer` null means self-signed.
  static Certificate HandBuilt(const Certificate* issuer, const PrivateKey& issuer_key,
                               const PublicKey& subject_key, const std::string& common_name,
                               const std::vector<std::pair<std::string, std::string>>& extensions,
                               int64_t not_before, int64_t not_after) {
    X509* x = X509_new();
    X509_set_version(x, X509_VERSION_3);
    ASN1_INTEGER_set(X509_get_serialNumber(x), 4242);
    X509_NAME* name = X509_NAME_new();
    X509_NAME_add_entry_by_txt(name, "CN", MBSTRING_UTF8,
                               reinterpret_cast<const unsigned char*>(common_name.c_str()), -1, -1,
                               0);
    X509_set_subject_name(x, name);
    X509_set_issuer_name(x, issuer != nullptr ? X509_get_subject_name(issuer->x509()) : name);
    X509_NAME_free(name);
    X509_set_pubkey(x, subject_key.evp());
    ASN1_TIME_set(X509_getm_notBefore(x), not_before);
    ASN1_TIME_set(X509_getm_notAfter(x), not_after);
    X509V3_CTX ctx;
    X509V3_set_ctx(&ctx, issuer != nullptr ? issuer->x509() : x, x, nullptr, nullptr, 0);
    for (const auto& [ext_name, value] : extensions) {
      X509_EXTENSION* ext = X509V3_EXT_conf(nullptr, &ctx, ext_name.c_str(), value.c_str());
      EXPECT_NE(ext, nullptr) << ext_name << "=" << value;
      X509_add_ext(x, ext, -1);
      X509_EXTENSION_free(ext);
    }
    EXPECT_GT(X509_sign(x, issuer_key.evp(), EVP_sha256()), 0);
    auto cert = Certificate::FromX509(x);
    X509_free(x);
    EXPECT_TRUE(cert.ok()) << cert.status();
    return std::move(cert).value();
  }

  Certificate HandBuiltLeaf(const std::vector<std::pair<std::string, std::string>>& extensions) {
    return HandBuilt(&ca(), ca_key_, leaf_key_.public_key(), "leaf", extensions, now_ - 60,
                     now_ + 3600);
  }

  int64_t now_ = 0;
  PrivateKey ca_key_ = NewKey();
  PrivateKey leaf_key_ = NewKey();
  std::vector<Certificate> ca_;  // Holds the one CA (Certificate has no default constructor).
};

// ---------------------------------------------------------------------------- CA

TEST_F(X509Test, CaIsCriticalCaTrueWithPathLenZero) {
  EXPECT_TRUE(ca().is_ca());
  EXPECT_TRUE(ExtensionIsCritical(ca(), NID_basic_constraints));
  EXPECT_EQ(X509_get_pathlen(ca().x509()), 0);
  EXPECT_EQ(X509_get_version(ca().x509()), X509_VERSION_3);
}

TEST_F(X509Test, CaKeyUsageIsCriticalCertSignCrlSignDigitalSignature) {
  EXPECT_TRUE(ExtensionIsCritical(ca(), NID_key_usage));
  EXPECT_EQ(X509_get_key_usage(ca().x509()),
            static_cast<uint32_t>(KU_KEY_CERT_SIGN | KU_CRL_SIGN | KU_DIGITAL_SIGNATURE));
}

TEST_F(X509Test, CaCarriesTrustDomainUriSanSubjectKeyIdAndValidity) {
  EXPECT_THAT(ca().UriSans(), ElementsAre(kTrustDomain));
  EXPECT_NE(X509_get0_subject_key_id(ca().x509()), nullptr);
  EXPECT_EQ(ca().not_before(), now_ - 3600);
  EXPECT_EQ(ca().not_after(), now_ + 30 * 86400);
  EXPECT_TRUE(ca().public_key().Equals(ca_key_.public_key()));
  char* subject = X509_NAME_oneline(X509_get_subject_name(ca().x509()), nullptr, 0);
  EXPECT_STREQ(subject, "/O=Mandate/CN=Mandate CA");
  OPENSSL_free(subject);
  EXPECT_EQ(X509_check_issued(ca().x509(), ca().x509()), X509_V_OK);  // Self-signed.
}

TEST_F(X509Test, CaDerAndPemRoundTrip) {
  auto from_der = Certificate::FromDer(ca().Der());
  ASSERT_TRUE(from_der.ok()) << from_der.status();
  EXPECT_TRUE(from_der->Equals(ca()));
  auto from_pem = Certificate::ParsePemChain(ca().Pem());
  ASSERT_TRUE(from_pem.ok()) << from_pem.status();
  ASSERT_EQ(from_pem->size(), 1u);
  EXPECT_TRUE((*from_pem)[0].Equals(ca()));
  EXPECT_TRUE(absl::StartsWith(ca().Pem(), "-----BEGIN CERTIFICATE-----\n"));
}

TEST_F(X509Test, CaRejectsBadOptions) {
  CaOptions with_path{
      .trust_domain_id = "spiffe://example.org/path", .not_before = 0, .not_after = 100};
  EXPECT_THAT(CreateSelfSignedCa(ca_key_, with_path).status().message(), HasSubstr("path"));
  CaOptions not_spiffe{.trust_domain_id = "https://example.org", .not_before = 0, .not_after = 100};
  EXPECT_FALSE(CreateSelfSignedCa(ca_key_, not_spiffe).ok());
  CaOptions backwards{.trust_domain_id = kTrustDomain, .not_before = 100, .not_after = 100};
  EXPECT_FALSE(CreateSelfSignedCa(ca_key_, backwards).ok());
}

TEST_F(X509Test, FromDerRejectsTrailingBytesAndGarbage) {
  EXPECT_THAT(Certificate::FromDer(ca().Der() + "x").status().message(), HasSubstr("trailing"));
  EXPECT_FALSE(Certificate::FromDer("not a certificate").ok());
  EXPECT_FALSE(Certificate::FromDer("").ok());
}

TEST_F(X509Test, ParseDerChainSplitsConcatenatedCertificates) {
  Certificate leaf = IssueLeaf(Leaf());
  auto chain = Certificate::ParseDerChain(leaf.Der() + ca().Der());
  ASSERT_TRUE(chain.ok()) << chain.status();
  ASSERT_EQ(chain->size(), 2u);
  EXPECT_TRUE((*chain)[0].Equals(leaf));
  EXPECT_TRUE((*chain)[1].Equals(ca()));
  EXPECT_FALSE(Certificate::ParseDerChain("").ok());
  EXPECT_FALSE(Certificate::ParseDerChain(leaf.Der() + "\x30\x03junk").ok());
}

TEST_F(X509Test, ParsePemChainKeepsOrderAndRejectsInputWithoutCertificates) {
  Certificate leaf = IssueLeaf(Leaf());
  auto chain = Certificate::ParsePemChain(leaf.Pem() + ca().Pem());
  ASSERT_TRUE(chain.ok()) << chain.status();
  ASSERT_EQ(chain->size(), 2u);
  EXPECT_TRUE((*chain)[0].Equals(leaf));
  EXPECT_TRUE((*chain)[1].Equals(ca()));
  EXPECT_FALSE(Certificate::ParsePemChain("").ok());
  EXPECT_FALSE(Certificate::ParsePemChain(leaf_key_.public_key().ToPem()).ok());
  EXPECT_FALSE(
      Certificate::ParsePemChain("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")
          .ok());
}

TEST_F(X509Test, CopiesShareTheCertificate) {
  Certificate copy = ca();
  EXPECT_EQ(copy.x509(), ca().x509());
  EXPECT_TRUE(copy.Equals(ca()));
}

// ---------------------------------------------------------------------------- Leaf

TEST_F(X509Test, LeafHasExactlyTheSpiffeIdAsUriSanAndNonEmptySubject) {
  Certificate leaf = IssueLeaf(Leaf());
  EXPECT_THAT(leaf.UriSans(), ElementsAre(kWorkloadId));
  EXPECT_TRUE(leaf.DnsSans().empty());
  EXPECT_TRUE(leaf.IpSans().empty());
  EXPECT_FALSE(ExtensionIsCritical(leaf, NID_subject_alt_name));
  EXPECT_GT(X509_NAME_entry_count(X509_get_subject_name(leaf.x509())), 0);
  EXPECT_EQ(X509_get_version(leaf.x509()), X509_VERSION_3);
}

TEST_F(X509Test, LeafIsCriticalCaFalse) {
  Certificate leaf = IssueLeaf(Leaf());
  EXPECT_FALSE(leaf.is_ca());
  EXPECT_TRUE(ExtensionIsCritical(leaf, NID_basic_constraints));
}

TEST_F(X509Test, LeafKeyUsageIsCriticalDigitalSignatureOnly) {
  Certificate leaf = IssueLeaf(Leaf());
  EXPECT_TRUE(ExtensionIsCritical(leaf, NID_key_usage));
  EXPECT_EQ(X509_get_key_usage(leaf.x509()), static_cast<uint32_t>(KU_DIGITAL_SIGNATURE));
}

TEST_F(X509Test, LeafExtendedKeyUsageIsServerAndClientAuth) {
  Certificate leaf = IssueLeaf(Leaf());
  EXPECT_EQ(X509_get_extended_key_usage(leaf.x509()),
            static_cast<uint32_t>(XKU_SSL_SERVER | XKU_SSL_CLIENT));
  LeafOptions server = Leaf();
  server.server_only = true;
  EXPECT_EQ(X509_get_extended_key_usage(IssueLeaf(server).x509()),
            static_cast<uint32_t>(XKU_SSL_SERVER));
}

TEST_F(X509Test, LeafAuthorityKeyIdIsTheCaSubjectKeyId) {
  Certificate leaf = IssueLeaf(Leaf());
  const ASN1_OCTET_STRING* aki = X509_get0_authority_key_id(leaf.x509());
  const ASN1_OCTET_STRING* ca_ski = X509_get0_subject_key_id(ca().x509());
  ASSERT_NE(aki, nullptr);
  ASSERT_NE(ca_ski, nullptr);
  EXPECT_EQ(ASN1_OCTET_STRING_cmp(aki, ca_ski), 0);
  EXPECT_NE(X509_get0_subject_key_id(leaf.x509()), nullptr);
}

TEST_F(X509Test, LeafSerialsArePositiveAndUnique) {
  std::set<std::string> serials;
  for (int i = 0; i < 20; ++i) {
    Certificate leaf = IssueLeaf(Leaf());
    EXPECT_EQ(ASN1_STRING_type(X509_get0_serialNumber(leaf.x509())), V_ASN1_INTEGER);
    std::string serial = leaf.SerialHex();
    EXPECT_FALSE(serial.empty());
    EXPECT_LE(serial.size(), 32u);
    EXPECT_NE(serial[0], '-');
    serials.insert(serial);
  }
  EXPECT_EQ(serials.size(), 20u);
  EXPECT_NE(ca().SerialHex(), IssueLeaf(Leaf()).SerialHex());
}

TEST_F(X509Test, RandomSerialHexIsLowercaseHexAndVaries) {
  auto a = RandomSerialHex();
  auto b = RandomSerialHex();
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_NE(*a, *b);
  EXPECT_LE(a->size(), 32u);
  EXPECT_EQ(a->find_first_not_of("0123456789abcdef"), std::string::npos);
}

TEST_F(X509Test, LeafValidityIsClampedToTheCa) {
  LeafOptions options = Leaf();
  options.not_before = ca().not_before() - 1000;
  options.not_after = ca().not_after() + 1000;
  Certificate leaf = IssueLeaf(options);
  EXPECT_EQ(leaf.not_before(), ca().not_before());
  EXPECT_EQ(leaf.not_after(), ca().not_after());
  Certificate normal = IssueLeaf(Leaf());
  EXPECT_EQ(normal.not_before(), now_ - 60);
  EXPECT_EQ(normal.not_after(), now_ + 3600);
}

TEST_F(X509Test, LeafEntirelyAfterCaExpiryIsRefused) {
  LeafOptions options = Leaf();
  options.not_before = ca().not_after() + 10;
  options.not_after = ca().not_after() + 100;
  EXPECT_THAT(SignLeaf(ca(), ca_key_, leaf_key_.public_key(), options).status().message(),
              HasSubstr("validity is empty"));
}

TEST_F(X509Test, LeafCarriesDnsAndIpSansWhenAsked) {
  LeafOptions options = Leaf("spiffe://example.org/broker");
  options.dns_sans = {"localhost"};
  options.ip_sans = {"127.0.0.1", "::1"};
  Certificate leaf = IssueLeaf(options);
  EXPECT_THAT(leaf.UriSans(), ElementsAre("spiffe://example.org/broker"));
  EXPECT_THAT(leaf.DnsSans(), ElementsAre("localhost"));
  EXPECT_THAT(leaf.IpSans(), ElementsAre("127.0.0.1", "::1"));
  EXPECT_EQ(X509_check_host(leaf.x509(), "localhost", 0, 0, nullptr), 1);
  EXPECT_EQ(X509_check_ip_asc(leaf.x509(), "127.0.0.1", 0), 1);
}

TEST_F(X509Test, LeafRefusesMalformedSans) {
  LeafOptions bad_ip = Leaf();
  bad_ip.ip_sans = {"127.0.0"};
  EXPECT_THAT(SignLeaf(ca(), ca_key_, leaf_key_.public_key(), bad_ip).status().message(),
              HasSubstr("IP SAN"));
  LeafOptions bad_dns = Leaf();
  bad_dns.dns_sans = {"a,URI:spiffe://evil"};
  EXPECT_THAT(SignLeaf(ca(), ca_key_, leaf_key_.public_key(), bad_dns).status().message(),
              HasSubstr("DNS SAN"));
  EXPECT_FALSE(SignLeaf(ca(), ca_key_, leaf_key_.public_key(), Leaf("https://x/y")).ok());
  EXPECT_FALSE(SignLeaf(ca(), ca_key_, leaf_key_.public_key(), Leaf("spiffe://a/b c")).ok());
}

TEST_F(X509Test, SignLeafRefusesMismatchedCaKeyAndNonCaIssuer) {
  PrivateKey other = NewKey();
  EXPECT_THAT(SignLeaf(ca(), other, leaf_key_.public_key(), Leaf()).status().message(),
              HasSubstr("does not match"));
  Certificate leaf = IssueLeaf(Leaf());
  EXPECT_THAT(SignLeaf(leaf, leaf_key_, leaf_key_.public_key(), Leaf()).status().message(),
              HasSubstr("not a CA"));
}

TEST_F(X509Test, SignLeafDerIssuesTheSameCertificateEncodedWithItsSerialAndValidity) {
  auto issued = SignLeafDer(ca(), ca_key_, leaf_key_.public_key(), Leaf());
  ASSERT_TRUE(issued.ok()) << issued.status();
  auto cert = Certificate::FromDer(issued->der);
  ASSERT_TRUE(cert.ok()) << cert.status();
  EXPECT_EQ(issued->serial_hex, cert->SerialHex());
  EXPECT_EQ(issued->not_before, cert->not_before());
  EXPECT_EQ(issued->not_after, cert->not_after());
  EXPECT_EQ(issued->not_after, now_ + 3600);
  EXPECT_EQ(cert->UriSans(), std::vector<std::string>{kWorkloadId});
  EXPECT_TRUE(cert->public_key().Equals(leaf_key_.public_key()));
  auto verified = VerifyX509SvidChain({*cert}, {ca()}, now_);
  EXPECT_TRUE(verified.ok()) << verified.status();
  // The same refusals as SignLeaf.
  EXPECT_THAT(SignLeafDer(ca(), NewKey(), leaf_key_.public_key(), Leaf()).status().message(),
              HasSubstr("does not match"));
  EXPECT_FALSE(SignLeafDer(ca(), ca_key_, leaf_key_.public_key(), Leaf("https://x/y")).ok());
}

TEST_F(X509Test, SignLeafRefusesWeakSubjectKey) {
  PrivateKey weak = KeyOfKind("RSA", 1024);
  EXPECT_THAT(SignLeaf(ca(), ca_key_, weak.public_key(), Leaf()).status().message(),
              HasSubstr("1024-bit RSA"));
}

// ---------------------------------------------------------------------------- CSR

TEST_F(X509Test, CsrRoundTripCarriesKeyAndSpiffeId) {
  auto csr = CreateCsrDer(leaf_key_, kWorkloadId);
  ASSERT_TRUE(csr.ok()) << csr.status();
  auto parsed = ParseAndVerifyCsrDer(*csr);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->key.Equals(leaf_key_.public_key()));
  EXPECT_THAT(parsed->uri_sans, ElementsAre(kWorkloadId));
}

TEST_F(X509Test, CsrWithoutSpiffeIdHasNoUriSans) {
  auto csr = CreateCsrDer(leaf_key_, "");
  ASSERT_TRUE(csr.ok()) << csr.status();
  auto parsed = ParseAndVerifyCsrDer(*csr);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->uri_sans.empty());
}

TEST_F(X509Test, CsrWithFlippedSignatureByteIsRefused) {
  auto csr = CreateCsrDer(leaf_key_, kWorkloadId);
  ASSERT_TRUE(csr.ok());
  std::string tampered = *csr;
  tampered.back() ^= 0x01;  // The last byte belongs to the signature's s value.
  EXPECT_THAT(ParseAndVerifyCsrDer(tampered).status().message(), HasSubstr("does not verify"));
}

TEST_F(X509Test, CsrWithChangedSpiffeIdIsRefused) {
  auto csr = CreateCsrDer(leaf_key_, "spiffe://example.org/aaaa");
  ASSERT_TRUE(csr.ok());
  std::string tampered = *csr;
  size_t at = tampered.find("/aaaa");
  ASSERT_NE(at, std::string::npos);
  tampered[at + 1] = 'b';
  EXPECT_FALSE(ParseAndVerifyCsrDer(tampered).ok());
}

TEST_F(X509Test, CsrWithTrailingGarbageIsRefused) {
  auto csr = CreateCsrDer(leaf_key_, kWorkloadId);
  ASSERT_TRUE(csr.ok());
  EXPECT_THAT(ParseAndVerifyCsrDer(*csr + "garbage").status().message(), HasSubstr("trailing"));
}

TEST_F(X509Test, OversizedOrMalformedCsrIsRefused) {
  EXPECT_THAT(ParseAndVerifyCsrDer(std::string(kMaxCsrDerBytes + 1, '\x30')).status().message(),
              HasSubstr("at most"));
  EXPECT_FALSE(ParseAndVerifyCsrDer("").ok());
  EXPECT_FALSE(ParseAndVerifyCsrDer("\x30\x03\x02\x01\x00").ok());
}

TEST_F(X509Test, CsrWithWeakOrUnsupportedKeyIsRefused) {
  auto rsa1024 = CreateCsrDer(KeyOfKind("RSA", 1024), kWorkloadId);
  ASSERT_TRUE(rsa1024.ok()) << rsa1024.status();
  EXPECT_THAT(ParseAndVerifyCsrDer(*rsa1024).status().message(), HasSubstr("1024-bit RSA"));
  auto ed25519 = CreateCsrDer(KeyOfKind("ED25519"), kWorkloadId);
  ASSERT_TRUE(ed25519.ok()) << ed25519.status();
  EXPECT_THAT(ParseAndVerifyCsrDer(*ed25519).status().message(), HasSubstr("not accepted"));
}

TEST_F(X509Test, CsrWithAcceptedKeyTypesParses) {
  for (auto [type, bits] : {std::pair<const char*, size_t>{"RSA", 2048}, {"EC", 0}}) {
    PrivateKey key = bits != 0 ? KeyOfKind(type, bits) : [] {
      EVP_PKEY* raw = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-384");
      BIO* bio = BIO_new(BIO_s_mem());
      PEM_write_bio_PrivateKey(bio, raw, nullptr, nullptr, 0, nullptr, nullptr);
      char* data = nullptr;
      long len = BIO_get_mem_data(bio, &data);
      auto k = PrivateKey::FromPem(std::string(data, static_cast<size_t>(len)));
      BIO_free(bio);
      EVP_PKEY_free(raw);
      return std::move(k).value();
    }();
    auto csr = CreateCsrDer(key, kWorkloadId);
    ASSERT_TRUE(csr.ok()) << csr.status();
    auto parsed = ParseAndVerifyCsrDer(*csr);
    ASSERT_TRUE(parsed.ok()) << type << ": " << parsed.status();
    // EC keys are written into the CSR without OpenSSL's encode/decode round trip.
    EXPECT_EQ(parsed->key.SpkiDer(), key.public_key().SpkiDer()) << type;
  }
}

// SignLeaf writes EC keys into the SubjectPublicKeyInfo itself (no encoder/decoder round trip)
// and RSA keys through X509_set_pubkey: every accepted type must come out as exactly the key.
TEST_F(X509Test, LeafSubjectPublicKeyIsExactlyTheSubjectKeyForEveryAcceptedType) {
  std::vector<PrivateKey> keys;
  keys.push_back(*PrivateKey::GenerateP256());
  {
    EVP_PKEY* raw = EVP_PKEY_Q_keygen(nullptr, nullptr, "EC", "P-384");
    BIO* bio = BIO_new(BIO_s_mem());
    PEM_write_bio_PrivateKey(bio, raw, nullptr, nullptr, 0, nullptr, nullptr);
    char* data = nullptr;
    long len = BIO_get_mem_data(bio, &data);
    keys.push_back(*PrivateKey::FromPem(std::string(data, static_cast<size_t>(len))));
    BIO_free(bio);
    EVP_PKEY_free(raw);
  }
  keys.push_back(KeyOfKind("RSA", 2048));
  for (const PrivateKey& key : keys) {
    auto leaf = SignLeaf(ca(), ca_key_, key.public_key(), Leaf());
    ASSERT_TRUE(leaf.ok()) << leaf.status();
    EXPECT_TRUE(leaf->public_key().Equals(key.public_key()));
    EXPECT_EQ(leaf->public_key().SpkiDer(), key.public_key().SpkiDer());
    auto verified = VerifyX509SvidChain({*leaf}, {ca()}, now_);
    EXPECT_TRUE(verified.ok()) << verified.status();
  }
}

TEST_F(X509Test, LeafIssuedFromCsrHasTheCsrKey) {
  auto csr = CreateCsrDer(leaf_key_, kWorkloadId);
  ASSERT_TRUE(csr.ok());
  auto parsed = ParseAndVerifyCsrDer(*csr);
  ASSERT_TRUE(parsed.ok());
  auto leaf = SignLeaf(ca(), ca_key_, parsed->key, Leaf());
  ASSERT_TRUE(leaf.ok()) << leaf.status();
  EXPECT_TRUE(leaf->public_key().Equals(leaf_key_.public_key()));
  EXPECT_EQ(X509_check_private_key(leaf->x509(), leaf_key_.evp()), 1);
}

// ---------------------------------------------------------------------------- Verify

TEST_F(X509Test, GoodChainVerifiesAndReturnsTheId) {
  Certificate leaf = IssueLeaf(Leaf());
  auto verified = VerifyX509SvidChain({leaf}, {ca()}, now_);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->spiffe_id, kWorkloadId);
  ASSERT_EQ(verified->chain.size(), 2u);
  EXPECT_TRUE(verified->chain[0].Equals(leaf));
  EXPECT_TRUE(verified->chain[1].Equals(ca()));
}

TEST_F(X509Test, ChainThatAlsoCarriesTheRootVerifies) {
  Certificate leaf = IssueLeaf(Leaf());
  EXPECT_TRUE(VerifyX509SvidChain({leaf, ca()}, {ca()}, now_).ok());
}

TEST_F(X509Test, EmptyChainOrNoRootsIsInvalidArgument) {
  EXPECT_EQ(VerifyX509SvidChain({}, {ca()}, now_).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(VerifyX509SvidChain({IssueLeaf(Leaf())}, {}, now_).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(X509Test, ExpiredLeafIsRefused) {
  Certificate leaf = IssueLeaf(Leaf());
  auto verified = VerifyX509SvidChain({leaf}, {ca()}, leaf.not_after() + 1);
  EXPECT_EQ(verified.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(verified.status().message(), HasSubstr("certificate has expired"));
  LeafOptions past = Leaf();
  past.not_before = now_ - 600;
  past.not_after = now_ - 300;
  EXPECT_THAT(VerifyX509SvidChain({IssueLeaf(past)}, {ca()}, now_).status().message(),
              HasSubstr("certificate has expired"));
}

TEST_F(X509Test, NotYetValidLeafIsRefused) {
  Certificate leaf = IssueLeaf(Leaf());
  EXPECT_THAT(VerifyX509SvidChain({leaf}, {ca()}, leaf.not_before() - 1).status().message(),
              HasSubstr("not yet valid"));
}

TEST_F(X509Test, LeafFromAnotherCaIsRefused) {
  PrivateKey other_key = NewKey();
  auto other_ca = CreateSelfSignedCa(other_key, CaOptions{.trust_domain_id = kTrustDomain,
                                                          .not_before = now_ - 60,
                                                          .not_after = now_ + 86400});
  ASSERT_TRUE(other_ca.ok());
  auto leaf = SignLeaf(*other_ca, other_key, leaf_key_.public_key(), Leaf());
  ASSERT_TRUE(leaf.ok());
  auto verified = VerifyX509SvidChain({*leaf}, {ca()}, now_);
  EXPECT_EQ(verified.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(verified.status().message(), HasSubstr("issuer certificate"));
  // Either CA in the roots is enough (rotation keeps old and new roots side by side).
  EXPECT_TRUE(VerifyX509SvidChain({*leaf}, {ca(), *other_ca}, now_).ok());
}

TEST_F(X509Test, LeafWithTwoUriSansIsRefused) {
  Certificate leaf =
      HandBuiltLeaf({{"basicConstraints", "critical,CA:FALSE"},
                     {"keyUsage", "critical,digitalSignature"},
                     {"subjectAltName", "URI:spiffe://example.org/a,URI:spiffe://example.org/b"}});
  EXPECT_THAT(VerifyX509SvidChain({leaf}, {ca()}, now_).status().message(),
              HasSubstr("leaf has 2 URI SANs, X509-SVIDs need exactly one"));
}

TEST_F(X509Test, LeafWithoutUriSanIsRefused) {
  Certificate leaf = HandBuiltLeaf({{"basicConstraints", "critical,CA:FALSE"},
                                    {"keyUsage", "critical,digitalSignature"},
                                    {"subjectAltName", "DNS:example.org"}});
  EXPECT_THAT(VerifyX509SvidChain({leaf}, {ca()}, now_).status().message(),
              HasSubstr("no URI SAN"));
}

TEST_F(X509Test, LeafWithNonSpiffeUriIsRefused) {
  Certificate leaf = HandBuiltLeaf({{"basicConstraints", "critical,CA:FALSE"},
                                    {"keyUsage", "critical,digitalSignature"},
                                    {"subjectAltName", "URI:https://example.org/a"}});
  EXPECT_THAT(VerifyX509SvidChain({leaf}, {ca()}, now_).status().message(), HasSubstr("spiffe://"));
}

TEST_F(X509Test, LeafWithoutKeyUsageOrWithCertSignIsRefused) {
  Certificate no_ku = HandBuiltLeaf({{"basicConstraints", "critical,CA:FALSE"},
                                     {"subjectAltName", std::string("URI:") + kWorkloadId}});
  EXPECT_THAT(VerifyX509SvidChain({no_ku}, {ca()}, now_).status().message(),
              HasSubstr("no keyUsage"));
  Certificate cert_sign = HandBuiltLeaf({{"basicConstraints", "critical,CA:FALSE"},
                                         {"keyUsage", "critical,digitalSignature,keyCertSign"},
                                         {"subjectAltName", std::string("URI:") + kWorkloadId}});
  EXPECT_THAT(VerifyX509SvidChain({cert_sign}, {ca()}, now_).status().message(),
              HasSubstr("keyCertSign"));
  Certificate no_digital_signature =
      HandBuiltLeaf({{"basicConstraints", "critical,CA:FALSE"},
                     {"keyUsage", "critical,keyEncipherment"},
                     {"subjectAltName", std::string("URI:") + kWorkloadId}});
  EXPECT_THAT(VerifyX509SvidChain({no_digital_signature}, {ca()}, now_).status().message(),
              HasSubstr("lacks digitalSignature"));
}

TEST_F(X509Test, HandBuiltConformingLeafVerifies) {
  // Guards the negative tests above: the hand-built leaves fail only for the broken rule.
  Certificate leaf = HandBuiltLeaf({{"basicConstraints", "critical,CA:FALSE"},
                                    {"keyUsage", "critical,digitalSignature"},
                                    {"subjectAltName", std::string("URI:") + kWorkloadId}});
  auto verified = VerifyX509SvidChain({leaf}, {ca()}, now_);
  ASSERT_TRUE(verified.ok()) << verified.status();
  EXPECT_EQ(verified->spiffe_id, kWorkloadId);
}

TEST_F(X509Test, CaPresentedAsLeafIsRefused) {
  auto verified = VerifyX509SvidChain({ca()}, {ca()}, now_);
  EXPECT_EQ(verified.status().code(), absl::StatusCode::kUnauthenticated);
  EXPECT_THAT(verified.status().message(), HasSubstr("leaf is a CA"));
}

TEST_F(X509Test, ChainThroughIntermediateVerifies) {
  PrivateKey root_key = NewKey();
  PrivateKey intermediate_key = NewKey();
  Certificate root = HandBuilt(nullptr, root_key, root_key.public_key(), "root",
                               {{"basicConstraints", "critical,CA:TRUE"},
                                {"keyUsage", "critical,keyCertSign,cRLSign"},
                                {"subjectKeyIdentifier", "hash"}},
                               now_ - 3600, now_ + 86400);
  Certificate intermediate =
      HandBuilt(&root, root_key, intermediate_key.public_key(), "intermediate",
                {{"basicConstraints", "critical,CA:TRUE"},
                 {"keyUsage", "critical,keyCertSign,cRLSign"},
                 {"subjectKeyIdentifier", "hash"},
                 {"authorityKeyIdentifier", "keyid:always"}},
                now_ - 3600, now_ + 86400);
  auto leaf = SignLeaf(intermediate, intermediate_key, leaf_key_.public_key(), Leaf());
  ASSERT_TRUE(leaf.ok()) << leaf.status();
  auto verified = VerifyX509SvidChain({*leaf, intermediate}, {root}, now_);
  ASSERT_TRUE(verified.ok()) << verified.status();
  ASSERT_EQ(verified->chain.size(), 3u);
  EXPECT_TRUE(verified->chain[2].Equals(root));
  // Without the intermediate the path cannot be built.
  EXPECT_FALSE(VerifyX509SvidChain({*leaf}, {root}, now_).ok());
  // An intermediate in the roots is itself an anchor (as in go-spiffe).
  EXPECT_TRUE(VerifyX509SvidChain({*leaf}, {intermediate}, now_).ok());
}

TEST_F(X509Test, MandateCaCannotCertifyAnIntermediate) {
  // pathlen:0 on the Mandate CA: a sub-CA under it must not be usable.
  PrivateKey intermediate_key = NewKey();
  Certificate intermediate = HandBuilt(&ca(), ca_key_, intermediate_key.public_key(), "sub",
                                       {{"basicConstraints", "critical,CA:TRUE"},
                                        {"keyUsage", "critical,keyCertSign"},
                                        {"subjectKeyIdentifier", "hash"}},
                                       now_ - 60, now_ + 3600);
  auto leaf = SignLeaf(intermediate, intermediate_key, leaf_key_.public_key(), Leaf());
  ASSERT_TRUE(leaf.ok()) << leaf.status();
  EXPECT_THAT(VerifyX509SvidChain({*leaf, intermediate}, {ca()}, now_).status().message(),
              HasSubstr("path length"));
}

// ---------------------------------------------------------------------------- Interop

class OpenSslInteropTest : public X509Test {
 protected:
  void SetUp() override {
    X509Test::SetUp();
    std::string templ = (std::filesystem::temp_directory_path() / "mandate-x509-XXXXXX").string();
    ASSERT_NE(::mkdtemp(templ.data()), nullptr);
    dir_ = templ;
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }
  std::string Write(const std::string& name, const std::string& contents) {
    std::string path = dir_ + "/" + name;
    std::ofstream(path, std::ios::binary) << contents;
    return path;
  }
  std::string dir_;
};

TEST_F(OpenSslInteropTest, OpenSslVerifiesLeafStrictly) {
  LeafOptions options = Leaf("spiffe://example.org/broker");
  options.dns_sans = {"localhost"};
  options.ip_sans = {"127.0.0.1"};
  std::string ca_path = Write("ca.pem", ca().Pem());
  std::string leaf_path = Write("leaf.pem", IssueLeaf(options).Pem());
  std::string out = RunCommand("openssl verify -x509_strict -CAfile " + ca_path + " " + leaf_path);
  EXPECT_THAT(out, HasSubstr(leaf_path + ": OK")) << out;
  out = RunCommand(
      "openssl verify -x509_strict -purpose sslserver -verify_hostname localhost "
      "-verify_ip 127.0.0.1 -CAfile " +
      ca_path + " " + leaf_path);
  EXPECT_THAT(out, HasSubstr(leaf_path + ": OK")) << out;
  out = RunCommand("openssl verify -x509_strict -purpose sslclient -CAfile " + ca_path + " " +
                   leaf_path);
  EXPECT_THAT(out, HasSubstr(leaf_path + ": OK")) << out;
}

TEST_F(OpenSslInteropTest, OpenSslRejectsLeafFromAnotherCa) {
  PrivateKey other_key = NewKey();
  auto other_ca = CreateSelfSignedCa(other_key, CaOptions{.trust_domain_id = kTrustDomain,
                                                          .not_before = now_ - 60,
                                                          .not_after = now_ + 86400});
  ASSERT_TRUE(other_ca.ok());
  std::string ca_path = Write("ca.pem", other_ca->Pem());
  std::string leaf_path = Write("leaf.pem", IssueLeaf(Leaf()).Pem());
  std::string out = RunCommand("openssl verify -CAfile " + ca_path + " " + leaf_path);
  EXPECT_THAT(out, ::testing::Not(HasSubstr(leaf_path + ": OK"))) << out;
}

TEST_F(OpenSslInteropTest, OpenSslTextShowsSvidProfile) {
  std::string leaf_path = Write("leaf.pem", IssueLeaf(Leaf()).Pem());
  std::string out = RunCommand("openssl x509 -noout -text -in " + leaf_path);
  EXPECT_THAT(out, HasSubstr(std::string("URI:") + kWorkloadId)) << out;
  EXPECT_THAT(out, HasSubstr("CA:FALSE"));
  EXPECT_THAT(out, HasSubstr("Digital Signature"));
  EXPECT_THAT(out, HasSubstr("TLS Web Server Authentication, TLS Web Client Authentication"));
  std::string ca_path = Write("ca.pem", ca().Pem());
  out = RunCommand("openssl x509 -noout -text -in " + ca_path);
  EXPECT_THAT(out, HasSubstr("URI:spiffe://example.org"));
  EXPECT_THAT(out, HasSubstr("CA:TRUE, pathlen:0"));
  EXPECT_THAT(out, HasSubstr("ecdsa-with-SHA256"));
}

TEST_F(OpenSslInteropTest, OpenSslAcceptsOurCsr) {
  auto csr = CreateCsrDer(leaf_key_, kWorkloadId);
  ASSERT_TRUE(csr.ok());
  std::string path = Write("req.der", *csr);
  std::string out = RunCommand("openssl req -inform DER -in " + path + " -noout -verify -text");
  EXPECT_THAT(out, HasSubstr("verify OK")) << out;
  EXPECT_THAT(out, HasSubstr(std::string("URI:") + kWorkloadId)) << out;
}

TEST_F(OpenSslInteropTest, WeParseOpenSslCsr) {
  std::string key_path = Write("key.pem", leaf_key_.ExportPemSecret());
  std::string csr_path = dir_ + "/req.der";
  std::string out = RunCommand("openssl req -new -key " + key_path +
                               " -subj /O=test -addext subjectAltName=URI:" + kWorkloadId +
                               " -outform DER -out " + csr_path);
  std::ifstream in(csr_path, std::ios::binary);
  std::string der((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  ASSERT_FALSE(der.empty()) << out;
  auto parsed = ParseAndVerifyCsrDer(der);
  ASSERT_TRUE(parsed.ok()) << parsed.status();
  EXPECT_TRUE(parsed->key.Equals(leaf_key_.public_key()));
  EXPECT_THAT(parsed->uri_sans, ElementsAre(kWorkloadId));
}

}  // namespace
}  // namespace mandate::crypto
