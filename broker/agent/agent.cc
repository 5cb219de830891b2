#include "broker/agent/agent.h"

#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "broker/common/util/status_macros.h"
#include "mandate/node/v1/node.pb.h"

namespace mandate::agent {
namespace {

constexpr size_t kMaxCsrsPerCall = 500;
constexpr auto kMaxRotationSleep = std::chrono::seconds(30);

std::string ChainDer(const std::vector<crypto::Certificate>& chain) {
  std::string out;
  for (const auto& cert : chain) out += cert.Der();
  return out;
}

std::string ChainPem(const std::vector<crypto::Certificate>& chain) {
  std::string out;
  for (const auto& cert : chain) out += cert.Pem();
  return out;
}

bool PastHalfLife(int64_t not_before, int64_t not_after, int64_t now) {
  return now >= not_before + (not_after - not_before) / 2;
}

}  // namespace

Agent::Agent(AgentOptions options, const Clock& clock)
    : options_(std::move(options)),
      clock_(clock),
      broker_(options_.broker_address, options_.trust_bundle_pem, options_.trust_domain) {
  auto initial = std::make_shared<Snapshot>();
  initial->generation = 1;
  initial->trust_domain = options_.trust_domain.name();
  current_ = std::move(initial);
}

Agent::~Agent() { Stop(); }

absl::StatusOr<std::unique_ptr<Agent>> Agent::Create(AgentOptions options, const Clock& clock) {
  if (options.trust_bundle_pem.empty()) return absl::InvalidArgumentError("empty trust bundle");
  RETURN_IF_ERROR(crypto::Certificate::ParsePemChain(options.trust_bundle_pem).status());
  return std::unique_ptr<Agent>(new Agent(std::move(options), clock));
}

absl::Status Agent::AdoptIdentity(std::vector<crypto::Certificate> chain, crypto::PrivateKey key,
                                  bool persist) {
  if (chain.empty()) return absl::InternalError("empty agent SVID chain");
  auto uris = chain.front().UriSans();
  if (uris.size() != 1) return absl::InternalError("agent SVID has no single SPIFFE ID");
  if (persist) {
    std::string key_pem = key.ExportPemSecret();
    absl::Status s = crypto::WriteFileAtomic(options_.data_dir + "/agent_svid.key", key_pem, 0600);
    OPENSSL_cleanse(key_pem.data(), key_pem.size());
    RETURN_IF_ERROR(s);
    RETURN_IF_ERROR(
        crypto::WriteFileAtomic(options_.data_dir + "/agent_svid.pem", ChainPem(chain), 0644));
  }
  RETURN_IF_ERROR(broker_.SetIdentity(chain, key));
  std::lock_guard<std::mutex> lock(identity_mu_);
  node_id_ = uris[0];
  identity_not_before_ = chain.front().not_before();
  identity_not_after_ = chain.front().not_after();
  return absl::OkStatus();
}

absl::Status Agent::LoadStoredIdentity() {
  auto pem = crypto::ReadFile(options_.data_dir + "/agent_svid.pem");
  if (!pem.ok()) return pem.status();
  auto key_pem = crypto::ReadFile(options_.data_dir + "/agent_svid.key");
  if (!key_pem.ok()) return key_pem.status();
  ASSIGN_OR_RETURN(auto chain, crypto::Certificate::ParsePemChain(*pem));
  ASSIGN_OR_RETURN(crypto::PrivateKey key, crypto::PrivateKey::FromPem(*key_pem));
  OPENSSL_cleanse(key_pem->data(), key_pem->size());
  ASSIGN_OR_RETURN(auto roots, crypto::Certificate::ParsePemChain(options_.trust_bundle_pem));
  ASSIGN_OR_RETURN(crypto::VerifiedSvid verified,
                   crypto::VerifyX509SvidChain(chain, roots, clock_.NowSeconds()));
  if (!chain.front().public_key().Equals(key.public_key())) {
    return absl::DataLossError("agent_svid.key does not match agent_svid.pem");
  }
  auto id = spiffe::SpiffeId::Parse(verified.spiffe_id);
  if (!id.ok() || !id->MemberOf(options_.trust_domain)) {
    return absl::FailedPreconditionError("stored agent SVID is for another trust domain");
  }
  return AdoptIdentity(std::move(chain), std::move(key), /*persist=*/false);
}

absl::Status Agent::EstablishIdentity(attestors::AgentNodeAttestor* attestor) {
  absl::Status stored = LoadStoredIdentity();
  if (stored.ok()) {
    spdlog::info("reusing stored agent SVID node={}", node_id_);
    return absl::OkStatus();
  }
  if (!absl::IsNotFound(stored)) {
    spdlog::warn("stored agent SVID unusable: {}", std::string(stored.message()));
  }
  if (attestor == nullptr) {
    return absl::FailedPreconditionError(
        absl::StrCat("no usable agent SVID in ", options_.data_dir,
                     " and no node attestor configured: give --join-token (or --join-token-file)"));
  }
  ASSIGN_OR_RETURN(crypto::PrivateKey key, crypto::PrivateKey::GenerateP256());
  ASSIGN_OR_RETURN(std::string csr, crypto::CreateCsrDer(key, ""));
  auto outcome = broker_.Attest(*attestor, csr);
  if (!outcome.ok()) {
    return absl::Status(outcome.status().code(),
                        absl::StrCat("node attestation failed: ", outcome.status().message()));
  }
  RETURN_IF_ERROR(AdoptIdentity(std::move(outcome->svid_chain), std::move(key), true));
  spdlog::info("node attested as {}", node_id_);
  return absl::OkStatus();
}

absl::Status Agent::RenewIdentity() {
  ASSIGN_OR_RETURN(crypto::PrivateKey key, crypto::PrivateKey::GenerateP256());
  ASSIGN_OR_RETURN(std::string csr, crypto::CreateCsrDer(key, node_id_));
  ASSIGN_OR_RETURN(auto chain, broker_.RenewAgentSvid(csr));
  RETURN_IF_ERROR(AdoptIdentity(std::move(chain), std::move(key), true));
  spdlog::info("agent SVID renewed node={}", node_id_);
  return absl::OkStatus();
}

void Agent::Start() {
  stop_ = false;
  sync_thread_ = std::thread([this] { SyncLoop(); });
  rotation_thread_ = std::thread([this] { RotationLoop(); });
}

void Agent::Stop() {
  if (stop_.exchange(true)) return;
  broker_.CancelSync();
  {
    std::lock_guard<std::mutex> lock(wake_mu_);
    wake_.notify_all();
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    changed_.notify_all();
  }
  if (sync_thread_.joinable()) sync_thread_.join();
  if (rotation_thread_.joinable()) rotation_thread_.join();
}

std::shared_ptr<const Snapshot> Agent::Current() const {
  std::lock_guard<std::mutex> lock(mu_);
  return current_;
}

std::shared_ptr<const Snapshot> Agent::WaitForChange(uint64_t seen,
                                                     std::chrono::milliseconds timeout) const {
  std::unique_lock<std::mutex> lock(mu_);
  changed_.wait_for(lock, timeout, [&] { return current_->generation != seen || stop_; });
  return current_;
}

void Agent::Publish(std::shared_ptr<Snapshot> next) {
  {
    std::lock_guard<std::mutex> lock(mu_);
    next->generation = current_->generation + 1;
    current_ = std::move(next);
    changed_.notify_all();
  }
  std::lock_guard<std::mutex> lock(wake_mu_);
  wake_.notify_all();
}

void Agent::StopServing(const std::string& reason) {
  std::lock_guard<std::mutex> update(update_mu_);
  if (!Current()->serving) return;
  spdlog::error("agent stops serving workloads: {}", reason);
  auto next = std::make_shared<Snapshot>();
  next->trust_domain = options_.trust_domain.name();
  next->serving = false;
  Publish(std::move(next));
  std::lock_guard<std::mutex> lock(jwt_mu_);
  jwt_cache_.clear();
}

void Agent::SyncLoop() {
  auto backoff = std::chrono::milliseconds(250);
  while (!stop_) {
    bool got_snapshot = false;
    absl::Status status = broker_.RunSync(
        [&](const mandate::node::v1::SyncResponse& response) {
          got_snapshot = true;
          ApplySync(response);
        },
        stop_);
    if (stop_) break;
    if (got_snapshot) backoff = std::chrono::milliseconds(250);
    if (absl::IsPermissionDenied(status) || absl::IsUnauthenticated(status)) {
      StopServing(std::string(status.message()));
    } else {
      spdlog::warn("sync stream to broker ended: {}", status.ToString());
    }
    std::unique_lock<std::mutex> lock(wake_mu_);
    wake_.wait_for(lock, backoff, [&] { return stop_.load(); });
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30000));
  }
}

void Agent::ApplySync(const mandate::node::v1::SyncResponse& response) {
  std::lock_guard<std::mutex> update(update_mu_);
  auto previous = Current();
  auto next = std::make_shared<Snapshot>();
  next->trust_domain = response.trust_domain();
  next->bundle_der = response.x509_bundle();
  next->jwt_bundle = response.jwt_bundle();
  next->serving = true;
  for (const auto& e : response.entries()) {
    AssignedEntry entry;
    entry.id = e.id();
    entry.spiffe_id = e.spiffe_id();
    entry.selectors =
        spiffe::SelectorSet(std::vector<std::string>(e.selectors().begin(), e.selectors().end()));
    entry.x509_ttl_seconds = e.x509_ttl_seconds();
    entry.jwt_ttl_seconds = e.jwt_ttl_seconds();
    if (auto it = previous->svids.find(entry.id); it != previous->svids.end()) {
      next->svids.emplace(entry.id, it->second);
    }
    next->entries.push_back(std::move(entry));
  }
  // Keep the broker trust bundle current for the next connection.
  if (auto bundle = crypto::Certificate::ParseDerChain(next->bundle_der); bundle.ok()) {
    std::string pem;
    for (const auto& cert : *bundle) pem += cert.Pem();
    broker_.SetTrustBundle(pem);
  }
  RefreshSvids(*next, /*only_due=*/false);
  Publish(std::move(next));
}

void Agent::RefreshSvids(Snapshot& next, bool only_due) {
  int64_t now = clock_.NowSeconds();
  std::vector<std::pair<std::string, std::string>> requests;
  std::map<std::string, crypto::PrivateKey> keys;
  for (const auto& entry : next.entries) {
    auto it = next.svids.find(entry.id);
    bool missing = it == next.svids.end();
    bool due = !missing && PastHalfLife(it->second->not_before, it->second->not_after, now);
    if (!(missing && !only_due) && !due) continue;
    auto key = crypto::PrivateKey::GenerateP256();
    if (!key.ok()) continue;
    auto csr = crypto::CreateCsrDer(*key, entry.spiffe_id);
    if (!csr.ok()) continue;
    requests.emplace_back(entry.id, std::move(*csr));
    keys.emplace(entry.id, std::move(*key));
  }
  for (size_t start = 0; start < requests.size(); start += kMaxCsrsPerCall) {
    size_t end = std::min(requests.size(), start + kMaxCsrsPerCall);
    std::vector<std::pair<std::string, std::string>> batch(requests.begin() + start,
                                                           requests.begin() + end);
    auto signed_svids = broker_.SignX509Svids(batch);
    if (!signed_svids.ok()) {
      spdlog::warn("broker refused to sign {} X509-SVIDs: {}", batch.size(),
                   signed_svids.status().ToString());
      continue;
    }
    for (auto& svid : *signed_svids) {
      auto key = keys.find(svid.entry_id);
      if (key == keys.end() || svid.chain.empty()) continue;
      auto held = std::make_shared<HeldX509Svid>();
      held->entry_id = svid.entry_id;
      held->spiffe_id = svid.spiffe_id;
      held->chain_der = ChainDer(svid.chain);
      held->key_pkcs8_der = key->second.ExportPkcs8DerSecret();
      held->not_before = svid.chain.front().not_before();
      held->not_after = svid.chain.front().not_after();
      next.svids[svid.entry_id] = std::move(held);
    }
  }
  // Drop SVIDs that expired without a successful renewal.
  for (auto it = next.svids.begin(); it != next.svids.end();) {
    it = it->second->not_after <= now ? next.svids.erase(it) : std::next(it);
  }
}

void Agent::RotationLoop() {
  while (!stop_) {
    int64_t now = clock_.NowSeconds();
    int64_t wake_at = now + kMaxRotationSleep.count();
    {
      std::lock_guard<std::mutex> lock(identity_mu_);
      wake_at = std::min(wake_at,
                         identity_not_before_ + (identity_not_after_ - identity_not_before_) / 2);
    }
    auto snapshot = Current();
    for (const auto& [id, svid] : snapshot->svids) {
      wake_at = std::min(wake_at, svid->not_before + (svid->not_after - svid->not_before) / 2);
    }
    if (wake_at > now) {
      std::unique_lock<std::mutex> lock(wake_mu_);
      wake_.wait_for(lock, std::chrono::seconds(wake_at - now), [&] { return stop_.load(); });
      if (stop_) break;
      if (clock_.NowSeconds() < wake_at) continue;  // Woken by a publish: recompute.
    }
    bool identity_due;
    {
      std::lock_guard<std::mutex> lock(identity_mu_);
      identity_due = PastHalfLife(identity_not_before_, identity_not_after_, clock_.NowSeconds());
    }
    if (identity_due) {
      if (auto s = RenewIdentity(); !s.ok()) {
        spdlog::warn("agent SVID renewal failed: {}", s.ToString());
      }
    }
    {
      std::lock_guard<std::mutex> update(update_mu_);
      auto current = Current();
      if (current->serving) {
        auto next = std::make_shared<Snapshot>(*current);
        RefreshSvids(*next, /*only_due=*/true);
        bool changed = next->svids.size() != current->svids.size();
        for (const auto& [id, svid] : next->svids) {
          auto old = current->svids.find(id);
          changed = changed || old == current->svids.end() || old->second != svid;
        }
        if (changed) Publish(std::move(next));
      }
    }
    {
      // Failed renewals must not spin: wait a little before looking again.
      std::unique_lock<std::mutex> lock(wake_mu_);
      wake_.wait_for(lock, std::chrono::seconds(1), [&] { return stop_.load(); });
    }
    std::lock_guard<std::mutex> lock(jwt_mu_);
    int64_t t = clock_.NowSeconds();
    for (auto it = jwt_cache_.begin(); it != jwt_cache_.end();) {
      it = it->second.jwt.expires_at <= t ? jwt_cache_.erase(it) : std::next(it);
    }
  }
}

std::vector<const AssignedEntry*> Agent::Match(const Snapshot& snapshot,
                                               const spiffe::SelectorSet& caller) {
  std::vector<const AssignedEntry*> out;
  for (const auto& entry : snapshot.entries) {
    if (caller.ContainsAll(entry.selectors)) out.push_back(&entry);
  }
  return out;
}

absl::StatusOr<MintedJwt> Agent::JwtSvid(const AssignedEntry& entry,
                                         const std::vector<std::string>& audiences) {
  std::vector<std::string> sorted = audiences;
  std::sort(sorted.begin(), sorted.end());
  sorted.erase(std::unique(sorted.begin(), sorted.end()), sorted.end());
  std::string key = absl::StrCat(entry.id, "\n", absl::StrJoin(sorted, "\n"));
  int64_t now = clock_.NowSeconds();
  {
    std::lock_guard<std::mutex> lock(jwt_mu_);
    auto it = jwt_cache_.find(key);
    if (it != jwt_cache_.end() &&
        !PastHalfLife(it->second.issued_at, it->second.jwt.expires_at, now)) {
      return it->second.jwt;
    }
  }
  ASSIGN_OR_RETURN(MintedJwt jwt, broker_.MintJwtSvid(entry.id, sorted));
  std::lock_guard<std::mutex> lock(jwt_mu_);
  if (jwt_cache_.size() >= options_.jwt_cache_capacity) {
    for (auto it = jwt_cache_.begin(); it != jwt_cache_.end();) {
      it = it->second.jwt.expires_at <= now ? jwt_cache_.erase(it) : std::next(it);
    }
    if (jwt_cache_.size() >= options_.jwt_cache_capacity) jwt_cache_.erase(jwt_cache_.begin());
  }
  jwt_cache_[key] = CachedJwt{jwt, now};
  return jwt;
}

}  // namespace mandate::agent
