#include "broker/server/audit/audit_checkpoint.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <nlohmann/json.hpp>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "broker/common/jose/jose.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {
namespace {

constexpr int64_t kCheckpointsVerified = 100;

// What a checkpoint at or past `base_seq` lists as not witnessed: `base` (what the newest genuine
// checkpoint, at `base_seq`, listed) and the records past it that the writing process found in
// the store rather than wrote (`found`).
std::vector<AuditSeqRange> Unwitnessed(std::vector<AuditSeqRange> base, int64_t base_seq,
                                       const std::vector<AuditSeqRange>& found) {
  for (const AuditSeqRange& r : found) {
    if (r.last > base_seq) AddAuditSeqRange(base, {std::max(r.first, base_seq + 1), r.last});
  }
  return base;
}

std::string FormatRanges(const std::vector<AuditSeqRange>& ranges) {
  return absl::StrJoin(ranges, ", ", [](std::string* out, const AuditSeqRange& r) {
    absl::StrAppend(out, r.first, "-", r.last);
  });
}

// The "unwitnessed" claim of a checkpoint payload at `seq`: sorted, disjoint, within 1..seq.
absl::StatusOr<std::vector<AuditSeqRange>> ParseUnwitnessed(const nlohmann::json& payload,
                                                            int64_t seq) {
  std::vector<AuditSeqRange> ranges;
  auto it = payload.find("unwitnessed");
  if (it == payload.end()) return ranges;
  const absl::Status malformed = absl::InvalidArgumentError(
      absl::StrCat("audit checkpoint at ", seq, " has a malformed \"unwitnessed\" claim"));
  if (!it->is_array() || it->size() > kMaxAuditSeqRanges) return malformed;
  int64_t after = 0;
  for (const nlohmann::json& r : *it) {
    if (!r.is_array() || r.size() != 2 || !r[0].is_number_integer() || !r[1].is_number_integer()) {
      return malformed;
    }
    AuditSeqRange range{r[0].get<int64_t>(), r[1].get<int64_t>()};
    if (range.first <= after || range.last < range.first || range.last > seq) return malformed;
    after = range.last;
    ranges.push_back(range);
  }
  return ranges;
}

struct NewestCheckpoint {
  int64_t seq = 0;  // 0: none verifies
  std::vector<AuditSeqRange> unwitnessed;
};

// The newest of the chain's newest kCheckpointsVerified checkpoints that verifies with `key`
// (store errors are returned; checkpoints that do not verify are passed over).
absl::StatusOr<NewestCheckpoint> FindNewestGenuineCheckpoint(store::Store& store,
                                                             const std::string& chain_id,
                                                             const crypto::PublicKey& key) {
  ASSIGN_OR_RETURN(std::vector<store::AuditCheckpoint> checkpoints,
                   store.ListAuditCheckpoints(chain_id, kCheckpointsVerified));
  NewestCheckpoint newest;
  for (const store::AuditCheckpoint& checkpoint : checkpoints) {
    absl::StatusOr<std::vector<AuditSeqRange>> ranges =
        VerifyAuditCheckpointRanges(store, checkpoint, key);
    if (absl::IsUnavailable(ranges.status()) || absl::IsInternal(ranges.status())) {
      return ranges.status();
    }
    if (ranges.ok() && checkpoint.seq > newest.seq) {
      newest.seq = checkpoint.seq;
      newest.unwitnessed = *std::move(ranges);
    }
  }
  return newest;
}

}  // namespace

AuditCheckpointer::AuditCheckpointer(store::Store& store, AuditLog& log, std::string issuer,
                                     JwsSigner sign, const crypto::PublicKey& key,
                                     const Clock& clock)
    : store_(store),
      log_(log),
      issuer_(std::move(issuer)),
      sign_(std::move(sign)),
      key_(key),
      clock_(clock) {}

AuditCheckpointer::~AuditCheckpointer() { Stop(); }

absl::Status AuditCheckpointer::LoadBaseLocked() {
  ASSIGN_OR_RETURN(NewestCheckpoint base,
                   FindNewestGenuineCheckpoint(store_, log_.chain_id(), key_));
  base_unwitnessed_ = std::move(base.unwitnessed);
  base_seq_ = base.seq;
  checkpointed_seq_ = base.seq;
  return absl::OkStatus();
}

absl::StatusOr<std::optional<store::AuditCheckpoint>> AuditCheckpointer::CheckpointNow() {
  absl::MutexLock lock(&mu_);
  const bool first = checkpointed_seq_ < 0;
  if (first) RETURN_IF_ERROR(LoadBaseLocked());
  // Only the head this process holds, checked against the store: never records it did not write.
  AuditLog::Head head;
  RETURN_IF_ERROR(log_.CheckStoredHead(&head));
  const std::vector<AuditSeqRange> unwitnessed =
      Unwitnessed(base_unwitnessed_, base_seq_, head.found);
  if (first && !unwitnessed.empty()) {
    spdlog::warn(
        "audit chain {}: records {} were found in the store, not written by a running "
        "broker; no checkpoint of this broker vouches for them",
        log_.chain_id(), FormatRanges(unwitnessed));
  }
  if (head.seq == 0 || head.seq <= checkpointed_seq_) return std::nullopt;

  store::AuditCheckpoint checkpoint;
  checkpoint.chain_id = log_.chain_id();
  checkpoint.seq = head.seq;
  checkpoint.hash = std::move(head.hash);
  checkpoint.time = clock_.NowSeconds();
  nlohmann::json payload = {{"iss", issuer_},
                            {"chain_id", checkpoint.chain_id},
                            {"seq", checkpoint.seq},
                            {"hash", checkpoint.hash},
                            {"iat", checkpoint.time}};
  if (!unwitnessed.empty()) {
    nlohmann::json ranges = nlohmann::json::array();
    for (const AuditSeqRange& r : unwitnessed) ranges.push_back({r.first, r.last});
    payload["unwitnessed"] = std::move(ranges);
  }
  ASSIGN_OR_RETURN(checkpoint.jws, sign_(kAuditCheckpointType, payload.dump()));
  RETURN_IF_ERROR(store_.AddAuditCheckpoint(checkpoint));
  checkpointed_seq_ = checkpoint.seq;
  spdlog::info("audit checkpoint chain={} seq={} hash={}{}", checkpoint.chain_id, checkpoint.seq,
               checkpoint.hash,
               unwitnessed.empty() ? "" : " unwitnessed=" + FormatRanges(unwitnessed));
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
  return VerifyAuditCheckpointRanges(store, checkpoint, key).status();
}

absl::StatusOr<std::vector<AuditSeqRange>> VerifyAuditCheckpointRanges(
    store::Store& store, const store::AuditCheckpoint& checkpoint, const crypto::PublicKey& key) {
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
  ASSIGN_OR_RETURN(std::vector<AuditSeqRange> unwitnessed, ParseUnwitnessed(p, checkpoint.seq));
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
  return unwitnessed;
}

namespace {

// Fills `verdict` for one chain; `own_status` / `own_head` come from this broker's
// CheckStoredHead and only count for its own chain.
absl::Status VerifyOneChain(store::Store& store, const crypto::PublicKey& key,
                            const absl::Status& own_status, const AuditLog::Head& own_head,
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
  std::vector<AuditSeqRange> unwitnessed;  // what the newest genuine checkpoint lists
  for (const store::AuditCheckpoint& checkpoint : checkpoints) {
    if (!verdict.status.ok()) break;
    absl::StatusOr<std::vector<AuditSeqRange>> ranges =
        VerifyAuditCheckpointRanges(store, checkpoint, key);
    if (absl::IsUnavailable(ranges.status()) || absl::IsInternal(ranges.status())) {
      return ranges.status();
    }
    if (!ranges.ok()) {
      verdict.status = ranges.status();
    } else if (checkpoint.seq > verdict.covered_seq) {
      verdict.covered_seq = checkpoint.seq;
      unwitnessed = *std::move(ranges);
    }
  }
  if (verdict.this_broker && verdict.status.ok()) verdict.status = own_status;
  if (!verdict.status.ok()) return absl::OkStatus();
  if (verdict.this_broker) {
    // Records past the newest genuine checkpoint that this process found in the store (at Open,
    // or added by another writer) were not witnessed: its head vouches only for the rest.
    verdict.not_vouched = Unwitnessed(std::move(unwitnessed), verdict.covered_seq, own_head.found);
    verdict.covered_seq = std::max(verdict.covered_seq, own_head.seq);
  } else {
    verdict.not_vouched = std::move(unwitnessed);
  }
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
  AuditLog::Head own_head;
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
