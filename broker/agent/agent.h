// The node agent's core: its own identity (attest once, then keep and renew the SVID), the
// entries the broker assigned to this node, and the workload SVIDs it holds for them.
//
// Everything workloads see is published as an immutable Snapshot; readers take a shared_ptr
// and never block writers. Streams wait on WaitForChange and push a new snapshot at once when
// entries change or SVIDs rotate.
//
// Thread-safety: all public methods may be called concurrently.
#ifndef MANDATE_BROKER_AGENT_AGENT_H_
#define MANDATE_BROKER_AGENT_AGENT_H_

#include <atomic>
#include <chrono>
#include <condition_variable>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <unordered_map>
#include <vector>

#include "absl/status/statusor.h"
#include "attestors/node/node_attestor.h"
#include "broker/agent/broker_client.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/crypto/x509.h"
#include "broker/common/spiffe/selector.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/clock.h"

namespace mandate::agent {

struct AssignedEntry {
  std::string id;
  std::string spiffe_id;
  spiffe::SelectorSet selectors;
  int64_t x509_ttl_seconds = 0;
  int64_t jwt_ttl_seconds = 0;
};

// An X509-SVID held for one entry: the key was generated here and never left the node except
// to the workload the entry matches.
struct HeldX509Svid {
  std::string entry_id;
  std::string spiffe_id;
  std::string chain_der;  // concatenated DER, leaf first
  std::string key_pkcs8_der;
  int64_t not_before = 0;
  int64_t not_after = 0;
};

struct Snapshot {
  uint64_t generation = 0;
  std::string trust_domain;  // name, e.g. "example.org"
  std::vector<AssignedEntry> entries;
  // Positions in `entries` keyed by one selector of each entry (its rarest): a caller can only
  // match an entry whose every selector it has, so the candidates for a caller are found by
  // looking up the caller's own selectors instead of scanning every entry. Built by
  // Agent::IndexEntries (Publish does it); Match falls back to a scan when it does not cover
  // `entries`.
  std::unordered_map<std::string, std::vector<uint32_t>> entry_index;
  size_t indexed_entries = 0;
  // Positions of the entries with a unix:sha256 selector (built with entry_index): only a
  // caller one of these could match needs its executable hashed.
  std::vector<uint32_t> sha256_entries;
  std::map<std::string, std::shared_ptr<const HeldX509Svid>> svids;  // by entry id
  std::string bundle_der;  // concatenated DER CA certificates
  std::string jwt_bundle;  // JWKS
  std::string issuer_url;  // the broker's; its token endpoint is <issuer_url>/token
  bool serving = false;    // false until the first sync and after eviction
};

struct AgentOptions {
  std::string data_dir;
  std::string broker_address;
  std::string trust_bundle_pem;
  spiffe::TrustDomain trust_domain;
  size_t jwt_cache_capacity = 4096;
};

class Agent {
 public:
  static absl::StatusOr<std::unique_ptr<Agent>> Create(AgentOptions options, const Clock& clock);
  ~Agent();

  // Establishes the node identity: a re-attesting attestor (TPM) always attests afresh; otherwise
  // the SVID kept in the data dir is reused when still valid, else `attestor` (which may be null
  // when none was configured) attests. `attestor` must outlive the agent.
  absl::Status EstablishIdentity(attestors::AgentNodeAttestor* attestor);
  // Starts the sync and rotation threads.
  void Start();
  void Stop();

  std::string node_id() const;
  // Blocks until the agent serves and holds an X509-SVID for every assigned entry, or
  // `timeout` passes. Returns whether it got there.
  bool WaitUntilReady(std::chrono::milliseconds timeout) const;
  std::shared_ptr<const Snapshot> Current() const;
  // Blocks until the snapshot generation differs from `seen` or `timeout` passes.
  std::shared_ptr<const Snapshot> WaitForChange(uint64_t seen,
                                                std::chrono::milliseconds timeout) const;

  // Entries of `snapshot` whose selectors are all among `caller`, in `entries` order.
  // O(|caller| + candidates) with the entry index, O(|entries|) without.
  static std::vector<const AssignedEntry*> Match(const Snapshot& snapshot,
                                                 const spiffe::SelectorSet& caller);
  // (Re)builds snapshot.entry_index for snapshot.entries.
  static void IndexEntries(Snapshot& snapshot);
  // Whether some entry of `snapshot` with a unix:sha256 selector has all its other selectors
  // among `without_hash`: only then can the caller's digest change what it matches.
  static bool NeedsExeHash(const Snapshot& snapshot, const spiffe::SelectorSet& without_hash);

  // The connection to the broker, for calls forwarded on a workload's behalf (tasks).
  BrokerClient& broker() { return broker_; }

  // A JWT-SVID for `entry` and `audiences`, from the cache while more than half its lifetime
  // remains, else freshly minted by the broker.
  absl::StatusOr<MintedJwt> JwtSvid(const AssignedEntry& entry,
                                    const std::vector<std::string>& audiences);

 private:
  Agent(AgentOptions options, const Clock& clock);
  absl::Status LoadStoredIdentity();
  absl::Status AdoptIdentity(std::vector<crypto::Certificate> chain, crypto::PrivateKey key,
                             bool persist);
  absl::Status RenewIdentity();
  absl::Status AttestWith(attestors::AgentNodeAttestor& attestor, bool persist);
  void SyncLoop();
  void RotationLoop();
  // Publishes the broker's entry set at once (removals take effect immediately) and asks the
  // rotation thread to sign what is missing; the sync stream never waits on signing.
  void ApplySync(const mandate::node::v1::SyncResponse& response);
  // Signs SVIDs for entries that have none or whose SVID is past half life, without holding any
  // lock over the broker call, then merges them into the current snapshot. Returns false when
  // some SVID could not be obtained (the caller backs off and retries).
  bool RefreshSvids();
  // Requires update_mu_.
  void Publish(std::shared_ptr<Snapshot> next);
  void Kick();
  void StopServing(const std::string& reason);

  const AgentOptions options_;
  const Clock& clock_;
  BrokerClient broker_;
  // Set when the node attestor can prove the node again at any time (TPM): renewal re-attests.
  // Not owned; outlives the agent. Used by the rotation thread only after EstablishIdentity.
  attestors::AgentNodeAttestor* reattestor_ = nullptr;
  mutable std::mutex identity_mu_;
  std::string node_id_;              // GUARDED_BY(identity_mu_)
  int64_t identity_not_before_ = 0;  // GUARDED_BY(identity_mu_)
  int64_t identity_not_after_ = 0;   // GUARDED_BY(identity_mu_)

  mutable std::mutex mu_;
  mutable std::condition_variable changed_;
  std::shared_ptr<const Snapshot> current_;  // GUARDED_BY(mu_)
  // Serialises snapshot rebuilds (sync and rotation) so neither loses the other's update.
  std::mutex update_mu_;

  struct CachedJwt {
    MintedJwt jwt;
    int64_t issued_at = 0;
  };
  std::mutex jwt_mu_;
  std::map<std::string, CachedJwt> jwt_cache_;  // GUARDED_BY(jwt_mu_)

  std::atomic<bool> stop_{false};
  std::mutex wake_mu_;
  std::condition_variable wake_;
  bool kicked_ = false;  // GUARDED_BY(wake_mu_): the rotation thread has work now
  std::thread sync_thread_;
  std::thread rotation_thread_;
};

}  // namespace mandate::agent

#endif  // MANDATE_BROKER_AGENT_AGENT_H_
