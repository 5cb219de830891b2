#include "broker/agent/agent.h"

#include <malloc.h>
#include <openssl/crypto.h>
#include <spdlog/spdlog.h>

#include <algorithm>
#include <future>
#include <iterator>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "broker/common/util/status_macros.h"
#include "mandate/node/v1/node.pb.h"

namespace mandate::agent {
namespace {

constexpr size_t kMaxCsrsPerCall = 500;
constexpr size_t kTrimAfterSvids = 200;
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

bool IsSha256Selector(std::string_view selector) { return selector.starts_with("unix:sha256:"); }

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
    // Key and chain in one file, replaced atomically: a crash can never leave a key that does
    // not match its certificate.
    std::string contents = key.ExportPemSecret() + ChainPem(chain);
    absl::Status s = crypto::WriteFileAtomic(options_.data_dir + "/agent_svid.pem", contents, 0600);
    OPENSSL_cleanse(contents.data(), contents.size());
    RETURN_IF_ERROR(s);
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
  auto chain = crypto::Certificate::ParsePemChain(*pem);
  auto key_or = crypto::PrivateKey::FromPem(*pem);
  OPENSSL_cleanse(pem->data(), pem->size());
  if (!chain.ok()) return chain.status();
  if (!key_or.ok()) return key_or.status();
  crypto::PrivateKey key = std::move(*key_or);
  ASSIGN_OR_RETURN(auto roots, crypto::Certificate::ParsePemChain(options_.trust_bundle_pem));
  ASSIGN_OR_RETURN(crypto::VerifiedSvid verified,
                   crypto::VerifyX509SvidChain(*chain, roots, clock_.NowSeconds()));
  if (!chain->front().public_key().Equals(key.public_key())) {
    return absl::DataLossError("the key in agent_svid.pem does not match its certificate");
  }
  auto id = spiffe::SpiffeId::Parse(verified.spiffe_id);
  if (!id.ok() || !id->MemberOf(options_.trust_domain)) {
    return absl::FailedPreconditionError("stored agent SVID is for another trust domain");
  }
  return AdoptIdentity(std::move(*chain), std::move(key), /*persist=*/false);
}

absl::Status Agent::EstablishIdentity(attestors::AgentNodeAttestor* attestor) {
  if (attestor != nullptr && attestor->CanReattest()) {
    // Hardware-backed attestors prove the node afresh every time; nothing is kept on disk.
    reattestor_ = attestor;
    RETURN_IF_ERROR(AttestWith(*attestor, /*persist=*/false));
    spdlog::info("node attested as {}", node_id());
    return absl::OkStatus();
  }
  absl::Status stored = LoadStoredIdentity();
  if (stored.ok()) {
    spdlog::info("reusing stored agent SVID node={}", node_id());
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
  RETURN_IF_ERROR(AttestWith(*attestor, /*persist=*/true));
  spdlog::info("node attested as {}", node_id());
  return absl::OkStatus();
}

absl::Status Agent::AttestWith(attestors::AgentNodeAttestor& attestor, bool persist) {
  ASSIGN_OR_RETURN(crypto::PrivateKey key, crypto::PrivateKey::GenerateP256());
  ASSIGN_OR_RETURN(std::string csr, crypto::CreateCsrDer(key, ""));
  auto outcome = broker_.Attest(attestor, csr);
  if (!outcome.ok()) {
    return absl::Status(outcome.status().code(),
                        absl::StrCat("node attestation failed: ", outcome.status().message()));
  }
  return AdoptIdentity(std::move(outcome->svid_chain), std::move(key), persist);
}

absl::Status Agent::RenewIdentity() {
  if (reattestor_ != nullptr) {
    // A TPM node renews by attesting again, binding the new key to a fresh quote.
    RETURN_IF_ERROR(AttestWith(*reattestor_, /*persist=*/false));
    spdlog::info("agent SVID renewed by re-attestation node={}", node_id());
    return absl::OkStatus();
  }
  ASSIGN_OR_RETURN(crypto::PrivateKey key, crypto::PrivateKey::GenerateP256());
  ASSIGN_OR_RETURN(std::string csr, crypto::CreateCsrDer(key, node_id()));
  ASSIGN_OR_RETURN(auto chain, broker_.RenewAgentSvid(csr));
  RETURN_IF_ERROR(AdoptIdentity(std::move(chain), std::move(key), true));
  spdlog::info("agent SVID renewed node={}", node_id());
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
  Kick();
  {
    std::lock_guard<std::mutex> lock(mu_);
    changed_.notify_all();
  }
  if (sync_thread_.joinable()) sync_thread_.join();
  if (rotation_thread_.joinable()) rotation_thread_.join();
}

std::string Agent::node_id() const {
  std::lock_guard<std::mutex> lock(identity_mu_);
  return node_id_;
}

bool Agent::WaitUntilReady(std::chrono::milliseconds timeout) const {
  auto deadline = std::chrono::steady_clock::now() + timeout;
  std::unique_lock<std::mutex> lock(mu_);
  return changed_.wait_until(lock, deadline, [&] {
    if (stop_) return true;
    if (!current_->serving) return false;
    for (const auto& entry : current_->entries) {
      if (!current_->svids.contains(entry.id)) return false;
    }
    return true;
  }) && !stop_;
}

void Agent::Kick() {
  std::lock_guard<std::mutex> lock(wake_mu_);
  kicked_ = true;
  wake_.notify_all();
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
  // Always rebuilt: cheap next to what led here (a sync or a round of signing), and a copied
  // snapshot whose entries were edited can never serve a stale index.
  IndexEntries(*next);
  std::lock_guard<std::mutex> lock(mu_);
  next->generation = current_->generation + 1;
  current_ = std::move(next);
  changed_.notify_all();
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
    if (absl::IsPermissionDenied(status)) {
      // Evicted, banned or unknown: never serve identities the broker no longer stands behind.
      StopServing(std::string(status.message()));
    } else if (absl::IsUnauthenticated(status)) {
      // Our SVID was superseded or expired (e.g. while renewing); reconnect with the current one.
      spdlog::info("sync stream needs the current agent SVID: {}", std::string(status.message()));
    } else {
      spdlog::warn("sync stream to broker ended: {}", status.ToString());
    }
    std::unique_lock<std::mutex> lock(wake_mu_);
    wake_.wait_for(lock, backoff, [&] { return stop_.load(); });
    backoff = std::min(backoff * 2, std::chrono::milliseconds(30000));
  }
}

void Agent::ApplySync(const mandate::node::v1::SyncResponse& response) {
  {
    std::lock_guard<std::mutex> update(update_mu_);
    auto previous = Current();
    auto next = std::make_shared<Snapshot>();
    next->trust_domain = response.trust_domain();
    next->bundle_der = response.x509_bundle();
    next->jwt_bundle = response.jwt_bundle();
    next->issuer_url = response.issuer_url();
    next->serving = true;
    int64_t now = clock_.NowSeconds();
    for (const auto& e : response.entries()) {
      AssignedEntry entry;
      entry.id = e.id();
      entry.spiffe_id = e.spiffe_id();
      entry.selectors =
          spiffe::SelectorSet(std::vector<std::string>(e.selectors().begin(), e.selectors().end()));
      entry.x509_ttl_seconds = e.x509_ttl_seconds();
      entry.jwt_ttl_seconds = e.jwt_ttl_seconds();
      if (auto it = previous->svids.find(entry.id); it != previous->svids.end() &&
                                                    it->second->spiffe_id == entry.spiffe_id &&
                                                    it->second->not_after > now) {
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
    Publish(std::move(next));
  }
  Kick();
}

bool Agent::RefreshSvids() {
  int64_t now = clock_.NowSeconds();
  auto snapshot = Current();
  if (!snapshot->serving) return true;
  // Entries needing an SVID; keys and CSRs are made one batch at a time below, so a node with
  // thousands of entries never holds thousands of private key objects at once.
  std::vector<const AssignedEntry*> needed;
  for (const auto& entry : snapshot->entries) {
    auto it = snapshot->svids.find(entry.id);
    if (it == snapshot->svids.end() ||
        PastHalfLife(it->second->not_before, it->second->not_after, now)) {
      needed.push_back(&entry);
    }
  }
  // One batch: fresh keys and CSRs, signed by the broker. False when it failed as a whole.
  auto sign_batch = [&](size_t start, std::vector<std::shared_ptr<HeldX509Svid>>& out) -> bool {
    size_t end = std::min(needed.size(), start + kMaxCsrsPerCall);
    std::vector<std::pair<std::string, std::string>> batch;
    std::unordered_map<std::string, crypto::PrivateKey> keys;
    batch.reserve(end - start);
    for (size_t i = start; i < end; ++i) {
      auto key = crypto::PrivateKey::GenerateP256();
      if (!key.ok()) return false;
      auto csr = crypto::CreateCsrDer(*key, needed[i]->spiffe_id);
      if (!csr.ok()) return false;
      batch.emplace_back(needed[i]->id, std::move(*csr));
      keys.emplace(needed[i]->id, std::move(*key));
    }
    auto signed_svids = broker_.SignX509Svids(batch);
    if (!signed_svids.ok()) {
      spdlog::warn("broker refused to sign {} X509-SVIDs: {}", batch.size(),
                   signed_svids.status().ToString());
      return false;
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
      out.push_back(std::move(held));
    }
    return true;
  };
  // Two batches in flight: the broker signs a batch on one handler thread, so a node with
  // thousands of entries would otherwise leave a broker core idle while it waits.
  bool complete = true;
  std::vector<std::shared_ptr<HeldX509Svid>> fresh;
  for (size_t start = 0; start < needed.size(); start += 2 * kMaxCsrsPerCall) {
    const size_t second = start + kMaxCsrsPerCall;
    std::vector<std::shared_ptr<HeldX509Svid>> other;
    std::future<bool> other_done;
    if (second < needed.size()) {
      other_done = std::async(std::launch::async, [&] { return sign_batch(second, other); });
    }
    if (!sign_batch(start, fresh)) complete = false;
    if (other_done.valid()) {
      if (!other_done.get()) complete = false;
      std::move(other.begin(), other.end(), std::back_inserter(fresh));
    }
  }
  if (fresh.size() < needed.size()) complete = false;
  // Merge into whatever is current now: entries removed meanwhile stay removed.
  std::lock_guard<std::mutex> update(update_mu_);
  auto current = Current();
  auto next = std::make_shared<Snapshot>(*current);
  bool changed = false;
  std::unordered_map<std::string_view, const AssignedEntry*> by_id;
  by_id.reserve(next->entries.size());
  for (const auto& entry : next->entries) by_id.emplace(entry.id, &entry);
  for (auto& held : fresh) {
    auto entry = by_id.find(held->entry_id);
    if (entry == by_id.end() || entry->second->spiffe_id != held->spiffe_id) continue;
    next->svids[held->entry_id] = std::move(held);
    changed = true;
  }
  now = clock_.NowSeconds();
  for (auto it = next->svids.begin(); it != next->svids.end();) {
    if (it->second->not_after <= now) {
      it = next->svids.erase(it);  // Expired without a successful renewal: stop serving it.
      changed = true;
    } else {
      ++it;
    }
  }
  if (changed) Publish(std::move(next));
  if (needed.size() >= kTrimAfterSvids) {
    // A large signing round leaves freed keys, CSRs and gRPC buffers scattered over glibc's
    // arenas; hand them back rather than keep the peak for the agent's lifetime.
    ::malloc_trim(0);
  }
  return complete;
}

void Agent::RotationLoop() {
  auto backoff = std::chrono::milliseconds(0);
  while (!stop_) {
    int64_t now = clock_.NowSeconds();
    int64_t wake_at = now + kMaxRotationSleep.count();
    {
      std::lock_guard<std::mutex> lock(identity_mu_);
      wake_at = std::min(wake_at,
                         identity_not_before_ + (identity_not_after_ - identity_not_before_) / 2);
    }
    auto snapshot = Current();
    for (const auto& entry : snapshot->entries) {
      auto it = snapshot->svids.find(entry.id);
      if (it == snapshot->svids.end()) {
        wake_at = now;  // Missing SVID: work to do now (or after the backoff below).
      } else {
        wake_at = std::min(
            wake_at, it->second->not_before + (it->second->not_after - it->second->not_before) / 2);
      }
    }
    {
      std::unique_lock<std::mutex> lock(wake_mu_);
      auto sleep = std::max<std::chrono::milliseconds>(
          backoff, std::chrono::seconds(std::max<int64_t>(0, wake_at - now)));
      wake_.wait_for(lock, sleep, [&] { return stop_.load() || kicked_; });
      if (stop_) break;
      bool kicked = kicked_;
      kicked_ = false;
      if (!kicked && backoff.count() == 0 && clock_.NowSeconds() < wake_at) continue;
    }
    bool ok = true;
    bool identity_due;
    {
      std::lock_guard<std::mutex> lock(identity_mu_);
      identity_due = PastHalfLife(identity_not_before_, identity_not_after_, clock_.NowSeconds());
    }
    if (identity_due) {
      if (auto s = RenewIdentity(); !s.ok()) {
        spdlog::warn("agent SVID renewal failed: {}", s.ToString());
        ok = false;
      }
    }
    ok = RefreshSvids() && ok;
    // Failed renewals back off exponentially instead of hammering the broker.
    backoff = ok ? std::chrono::milliseconds(0)
                 : std::min(std::max(backoff * 2, std::chrono::milliseconds(500)),
                            std::chrono::milliseconds(30000));
    std::lock_guard<std::mutex> lock(jwt_mu_);
    int64_t t = clock_.NowSeconds();
    for (auto it = jwt_cache_.begin(); it != jwt_cache_.end();) {
      it = it->second.jwt.expires_at <= t ? jwt_cache_.erase(it) : std::next(it);
    }
  }
}

void Agent::IndexEntries(Snapshot& snapshot) {
  // Each entry goes under its rarest selector: many entries often share one (a common path or
  // gid) while a uid, hash or unit usually singles a few out, so a caller's lookups then yield
  // few candidates. Any one selector of the entry would be correct: a matching caller has all.
  std::unordered_map<std::string_view, uint32_t> frequency;
  for (const auto& entry : snapshot.entries) {
    for (const std::string& selector : entry.selectors.strings()) ++frequency[selector];
  }
  snapshot.entry_index.clear();
  snapshot.sha256_entries.clear();
  for (size_t i = 0; i < snapshot.entries.size(); ++i) {
    const auto& selectors = snapshot.entries[i].selectors.strings();
    if (std::any_of(selectors.begin(), selectors.end(), IsSha256Selector)) {
      snapshot.sha256_entries.push_back(static_cast<uint32_t>(i));
    }
    // An entry without selectors matches no one, so it needs no index slot.
    if (selectors.empty()) continue;
    const std::string* rarest = &selectors.front();
    for (const std::string& selector : selectors) {
      if (frequency[selector] < frequency[*rarest]) rarest = &selector;
    }
    snapshot.entry_index[*rarest].push_back(static_cast<uint32_t>(i));
  }
  snapshot.indexed_entries = snapshot.entries.size();
}

bool Agent::NeedsExeHash(const Snapshot& snapshot, const spiffe::SelectorSet& without_hash) {
  auto could_match = [&](const AssignedEntry& entry) {
    bool has_sha256 = false;
    for (const std::string& selector : entry.selectors.strings()) {
      if (IsSha256Selector(selector)) {
        has_sha256 = true;
      } else if (!without_hash.Contains(selector)) {
        return false;
      }
    }
    return has_sha256;
  };
  if (snapshot.indexed_entries != snapshot.entries.size()) {
    return std::any_of(snapshot.entries.begin(), snapshot.entries.end(), could_match);
  }
  return std::any_of(snapshot.sha256_entries.begin(), snapshot.sha256_entries.end(),
                     [&](uint32_t i) { return could_match(snapshot.entries[i]); });
}

std::vector<const AssignedEntry*> Agent::Match(const Snapshot& snapshot,
                                               const spiffe::SelectorSet& caller) {
  std::vector<const AssignedEntry*> out;
  if (snapshot.indexed_entries != snapshot.entries.size()) {
    for (const auto& entry : snapshot.entries) {
      if (caller.ContainsAll(entry.selectors)) out.push_back(&entry);
    }
    return out;
  }
  std::vector<uint32_t> candidates;
  for (const std::string& selector : caller.strings()) {
    auto it = snapshot.entry_index.find(selector);
    if (it != snapshot.entry_index.end()) {
      candidates.insert(candidates.end(), it->second.begin(), it->second.end());
    }
  }
  // Each entry sits under exactly one key, so there are no duplicates; sort for entries order.
  std::sort(candidates.begin(), candidates.end());
  for (uint32_t i : candidates) {
    const AssignedEntry& entry = snapshot.entries[i];
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
