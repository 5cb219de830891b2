#include "broker/server/audit/audit_checkpoint.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {

AuditCheckpointer::AuditCheckpointer(store::Store& store, std::string chain_id, std::string issuer,
                                     JwsSigner sign, const Clock& clock)
    : store_(store),
      chain_id_(std::move(chain_id)),
      issuer_(std::move(issuer)),
      sign_(std::move(sign)),
      clock_(clock) {}

AuditCheckpointer::~AuditCheckpointer() { Stop(); }

absl::StatusOr<std::optional<store::AuditCheckpoint>> AuditCheckpointer::CheckpointNow() {
  absl::MutexLock lock(&mu_);
  if (checkpointed_seq_ < 0) {
    ASSIGN_OR_RETURN(std::vector<store::AuditCheckpoint> latest,
                     store_.ListAuditCheckpoints(chain_id_, 1));
    checkpointed_seq_ = latest.empty() ? 0 : latest.front().seq;
  }
  absl::StatusOr<store::AuditRecord> head = store_.LastAuditRecord(chain_id_);
  if (absl::IsNotFound(head.status())) return std::nullopt;
  if (!head.ok()) return head.status();
  if (head->seq <= checkpointed_seq_) return std::nullopt;

  store::AuditCheckpoint checkpoint;
  checkpoint.chain_id = chain_id_;
  checkpoint.seq = head->seq;
  checkpoint.hash = head->hash;
  checkpoint.time = clock_.NowSeconds();
  nlohmann::json payload = {{"iss", issuer_},
                            {"chain_id", checkpoint.chain_id},
                            {"seq", checkpoint.seq},
                            {"hash", checkpoint.hash},
                            {"iat", checkpoint.time}};
  ASSIGN_OR_RETURN(checkpoint.jws, sign_(kAuditCheckpointType, payload.dump()));
  RETURN_IF_ERROR(store_.AddAuditCheckpoint(checkpoint));
  checkpointed_seq_ = checkpoint.seq;
  spdlog::info("audit checkpoint chain={} seq={} hash={}", checkpoint.chain_id, checkpoint.seq,
               checkpoint.hash);
  return checkpoint;
}

void AuditCheckpointer::Start(std::chrono::seconds interval) {
  thread_ = std::thread([this, interval] {
    while (true) {
      {
        absl::MutexLock lock(&mu_);
        auto stopping = [this]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return stopping_; };
        if (mu_.AwaitWithTimeout(absl::Condition(&stopping), absl::FromChrono(interval))) return;
      }
      if (auto checkpoint = CheckpointNow(); !checkpoint.ok()) {
        spdlog::error("audit checkpoint failed: {}", std::string(checkpoint.status().message()));
      }
    }
  });
}

void AuditCheckpointer::Stop() {
  {
    absl::MutexLock lock(&mu_);
    if (stopping_) return;
    stopping_ = true;
  }
  if (thread_.joinable()) thread_.join();
  if (auto checkpoint = CheckpointNow(); !checkpoint.ok()) {
    spdlog::error("final audit checkpoint failed: {}", std::string(checkpoint.status().message()));
  }
}

absl::Status VerifyAuditCheckpoint(store::Store& store, const store::AuditCheckpoint& checkpoint,
                                   const crypto::PublicKey& key) {
  ASSIGN_OR_RETURN(jose::ParsedJws jws, jose::ParseCompact(checkpoint.jws));
  RETURN_IF_ERROR(jose::VerifySignature(jws, key));
  const nlohmann::json& p = jws.payload;
  auto header_typ = jws.header.find("typ");
  if (header_typ == jws.header.end() || *header_typ != kAuditCheckpointType) {
    return absl::InvalidArgumentError("not an audit checkpoint (typ)");
  }
  auto chain_id = p.find("chain_id");
  auto seq = p.find("seq");
  auto hash = p.find("hash");
  if (chain_id == p.end() || *chain_id != checkpoint.chain_id || seq == p.end() ||
      !seq->is_number_integer() || seq->get<int64_t>() != checkpoint.seq || hash == p.end() ||
      *hash != checkpoint.hash) {
    return absl::InvalidArgumentError(
        absl::StrCat("audit checkpoint at ", checkpoint.seq, " does not match its signed payload"));
  }
  store::AuditQuery query;
  query.chain_id = checkpoint.chain_id;
  query.after_seq = checkpoint.seq - 1;
  query.limit = 1;
  ASSIGN_OR_RETURN(std::vector<store::AuditRecord> records, store.ListAuditRecords(query));
  if (records.empty() || records.front().seq != checkpoint.seq) {
    return absl::DataLossError(absl::StrCat("audit chain ", checkpoint.chain_id, " has no record ",
                                            checkpoint.seq,
                                            ", which a signed checkpoint names (cut?)"));
  }
  if (records.front().hash != checkpoint.hash) {
    return absl::DataLossError(absl::StrCat("audit chain ", checkpoint.chain_id, ": record ",
                                            checkpoint.seq,
                                            "'s hash differs from the signed checkpoint's "
                                            "(rewritten?)"));
  }
  return absl::OkStatus();
}

namespace {

constexpr int64_t kCheckpointsVerified = 100;

// Fills `verdict` for one chain; `own_status` / `own_head` come from this broker's
// CheckStoredHead and only count for its own chain.
absl::Status VerifyOneChain(store::Store& store, const crypto::PublicKey& key,
                            const absl::Status& own_status, int64_t own_head,
                            AuditChainVerdict& verdict) {
  ASSIGN_OR_RETURN(AuditChainReport report, VerifyAuditChain(store, verdict.chain_id));
  verdict.records = report.records;
  verdict.head_hash = std::move(report.head_hash);
  verdict.status = std::move(report.status);
  // The chain must still hold what its signed checkpoints name: a cut tail or a recomputed
  // chain fails here even though it links up.
  ASSIGN_OR_RETURN(std::vector<store::AuditCheckpoint> checkpoints,
                   store.ListAuditCheckpoints(verdict.chain_id, kCheckpointsVerified));
  verdict.checkpoints = static_cast<int64_t>(checkpoints.size());
  verdict.checkpointed_seq = checkpoints.empty() ? 0 : checkpoints.front().seq;
  for (const store::AuditCheckpoint& checkpoint : checkpoints) {
    if (!verdict.status.ok()) break;
    absl::Status status = VerifyAuditCheckpoint(store, checkpoint, key);
    if (absl::IsUnavailable(status) || absl::IsInternal(status)) return status;
    if (status.ok()) {
      verdict.covered_seq = std::max(verdict.covered_seq, checkpoint.seq);
    } else {
      verdict.status = std::move(status);
    }
  }
  if (verdict.this_broker && verdict.status.ok()) verdict.status = own_status;
  if (!verdict.status.ok()) return absl::OkStatus();
  if (verdict.this_broker) verdict.covered_seq = std::max(verdict.covered_seq, own_head);
  if (verdict.covered_seq == 0 && verdict.records > 0) {
    verdict.unverified = true;
    verdict.status = absl::FailedPreconditionError(absl::StrCat(
        "audit chain ", verdict.chain_id,
        " is not this broker's, and no checkpoint signed by a "
        "key this broker knows covers any of its ",
        verdict.records, " records (fabricated, or written by a broker with another key)"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::vector<AuditChainVerdict>> VerifyAuditStore(store::Store& store, AuditLog& own,
                                                                const crypto::PublicKey& key) {
  int64_t own_head = 0;
  absl::Status own_status = own.CheckStoredHead(&own_head);
  if (!own_status.ok() && !absl::IsDataLoss(own_status)) return own_status;
  ASSIGN_OR_RETURN(std::vector<std::string> chains, store.ListAuditChains());
  if (std::find(chains.begin(), chains.end(), own.chain_id()) == chains.end()) {
    // This broker's chain has no record in the store. Fine for a broker that has written none
    // (and whose chain no checkpoint names); otherwise the chain was deleted.
    ASSIGN_OR_RETURN(std::vector<store::AuditCheckpoint> own_checkpoints,
                     store.ListAuditCheckpoints(own.chain_id(), 1));
    if (!own_status.ok() || !own_checkpoints.empty()) chains.push_back(own.chain_id());
  }
  std::vector<AuditChainVerdict> verdicts;
  verdicts.reserve(chains.size());
  for (std::string& chain : chains) {
    AuditChainVerdict& verdict = verdicts.emplace_back();
    verdict.chain_id = std::move(chain);
    verdict.this_broker = verdict.chain_id == own.chain_id();
    RETURN_IF_ERROR(VerifyOneChain(store, key, own_status, own_head, verdict));
  }
  return verdicts;
}

}  // namespace mandate::broker
