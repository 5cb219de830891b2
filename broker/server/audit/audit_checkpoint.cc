#include "broker/server/audit/audit_checkpoint.h"

#include <spdlog/spdlog.h>

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

}  // namespace mandate::broker
