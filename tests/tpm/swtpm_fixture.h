// A throwaway software TPM (swtpm) for tests: its own temp dir, its own local EK CA, its own
// unix socket. Nothing is left behind: the destructor kills swtpm by pid and removes the dir.
//
// Each Swtpm gets a fresh CA unless SwtpmOptions::same_ca_as names another instance, so "a TPM
// from another CA" is simply a second Swtpm. Needs swtpm, swtpm_setup and swtpm_localca on PATH
// (Debian: swtpm, swtpm-tools), plus tpm2_nvundefine (tpm2-tools) for without_rsa_ek_cert,
// tpm2_evictcontrol for without_persistent_eks.
// Not thread-safe; one Swtpm per test is the intended use. swtpm serves one client at a time and
// has no resource manager, so keep at most one TPM client (ESYS context) open on it at a time.
#ifndef MANDATE_TESTS_TPM_SWTPM_FIXTURE_H_
#define MANDATE_TESTS_TPM_SWTPM_FIXTURE_H_

#include <sys/types.h>

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "gtest/gtest.h"

namespace mandate::testing {

class Swtpm;

struct SwtpmOptions {
  // Remove the RSA EK certificate (NV 0x01c00002) after setup, so an agent must fall back to the
  // ECC EK (swtpm's is P-384, template H-3, certificate at 0x01c00016).
  bool without_rsa_ek_cert = false;
  // Evict the EKs swtpm_setup persisted (0x81010001 RSA, 0x81010016 ECC), as on TPMs whose
  // platform provisioned none: an agent must then derive the EK from the TCG template.
  bool without_persistent_eks = false;
  // Issue the EK certificates from this instance's CA instead of a fresh one. Must outlive setup
  // only (the CA files are read by swtpm_setup during Start).
  const Swtpm* same_ca_as = nullptr;
};

class Swtpm {
 public:
  // Creates the state (swtpm_setup with --create-ek-cert --create-platform-cert and a private
  // config, never the system's), starts `swtpm socket` and waits until it accepts connections.
  // Fails with the setup or swtpm log text on error; a failed Start leaves nothing behind.
  static absl::StatusOr<std::unique_ptr<Swtpm>> Start(const SwtpmOptions& options = {});

  ~Swtpm();
  Swtpm(const Swtpm&) = delete;
  Swtpm& operator=(const Swtpm&) = delete;

  // tss2 TCTI configuration, e.g. "swtpm:path=/tmp/swtpm.AbC123/tpm.sock".
  const std::string& tcti() const { return tcti_; }
  // PEM bundle to trust for this TPM's EK certificate: the local CA's root, then the issuing
  // (intermediate) certificate.
  const std::string& ek_ca_bundle_path() const { return ek_ca_bundle_path_; }
  // The temp dir holding everything (state, CA, sockets, logs); removed by the destructor. Tests
  // may put their own files (e.g. a store) under it.
  const std::string& dir() const { return dir_; }
  pid_t pid() const { return pid_; }

 private:
  explicit Swtpm(std::string dir) : dir_(std::move(dir)) {}
  absl::Status Setup(const SwtpmOptions& options);
  absl::Status Launch();
  void Stop();

  std::string dir_;
  std::string ca_dir_;
  std::string tcti_;
  std::string ek_ca_bundle_path_;
  pid_t pid_ = -1;
};

// GoogleTest fixture: a fresh swtpm per test in `swtpm_` (skipped when swtpm is not installed,
// failed instead under CI=true: MANDATE_REQUIRE_SWTPM).
class SwtpmTest : public ::testing::Test {
 protected:
  void SetUp() override;
  void TearDown() override { swtpm_.reset(); }

  std::unique_ptr<Swtpm> swtpm_;
};

// True when swtpm, swtpm_setup and swtpm_localca are on PATH.
bool SwtpmAvailable();

// True when the environment says CI=true (as CI services set it).
bool RunningInCi();

// In a test body or SetUp: skips the test when swtpm is not installed, except under CI=true,
// where a missing swtpm fails it: CI must run the TPM suite, not pass it by skipping it all.
#define MANDATE_REQUIRE_SWTPM()                                                              \
  do {                                                                                       \
    if (!::mandate::testing::SwtpmAvailable()) {                                             \
      if (::mandate::testing::RunningInCi()) {                                               \
        GTEST_FAIL() << "swtpm is not installed, and CI=true requires the TPM suite to run " \
                        "(deploy/install-deps.sh installs it)";                              \
      }                                                                                      \
      GTEST_SKIP() << "swtpm is not installed";                                              \
    }                                                                                        \
  } while (false)

}  // namespace mandate::testing

#endif  // MANDATE_TESTS_TPM_SWTPM_FIXTURE_H_
