#include "broker/server/audit/audit_log.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <filesystem>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/util/status_macros.h"

namespace mandate::broker {
namespace {

constexpr char kChainIdFile[] = "audit-chain-id";
constexpr int64_t kVerifyPage = 1000;

// Length-prefixed, so no two different records encode alike whatever bytes their fields hold.
void AppendField(std::string& out, const std::string& value) {
  absl::StrAppend(&out, value.size(), ":", value, ";");
}

bool IsChainId(std::string_view id) {
  return !id.empty() && id.size() <= 64 && std::all_of(id.begin(), id.end(), [](char c) {
    return absl::ascii_isalnum(static_cast<unsigned char>(c)) || c == '-' || c == '_';
  });
}

}  // namespace

std::string AuditRecordHash(const store::AuditRecord& r) {
  std::string encoded = "mandate-audit-v1;";
  AppendField(encoded, r.chain_id);
  AppendField(encoded, absl::StrCat(r.seq));
  AppendField(encoded, absl::StrCat(r.time));
  AppendField(encoded, r.event);
  AppendField(encoded, r.outcome);
  AppendField(encoded, r.spiffe_id);
  AppendField(encoded, r.node_id);
  AppendField(encoded, r.task_id);
  AppendField(encoded, r.credential_id);
  AppendField(encoded, r.detail);
  AppendField(encoded, r.prev_hash);
  return crypto::HexEncode(crypto::Sha256(encoded));
}

absl::StatusOr<std::unique_ptr<AuditLog>> AuditLog::Open(store::Store& store, std::string chain_id,
                                                         const Clock& clock,
                                                         AuditLogOptions options) {
  if (!IsChainId(chain_id)) {
    return absl::InvalidArgumentError("audit chain id must be 1-64 of [A-Za-z0-9_-]");
  }
  options.max_batch = std::max<size_t>(options.max_batch, 1);
  std::unique_ptr<AuditLog> log(new AuditLog(store, std::move(chain_id), clock, options));
  RETURN_IF_ERROR(log->LoadHead());
  if (log->head_seq_ > 0) AddAuditSeqRange(log->found_, {1, log->head_seq_});
  return log;
}

absl::Status AuditLog::LoadHead() {
  absl::StatusOr<store::AuditRecord> last = store_.LastAuditRecord(chain_id_);
  if (absl::IsNotFound(last.status())) {
    head_seq_ = 0;
    head_hash_.clear();
  } else if (!last.ok()) {
    return last.status();
  } else {
    head_seq_ = last->seq;
    head_hash_ = std::move(last->hash);
  }
  head_stale_ = false;
  return absl::OkStatus();
}

absl::Status AuditLog::ReloadStaleHead() {
  const int64_t known = head_seq_;
  RETURN_IF_ERROR(LoadHead());
  if (head_seq_ > known && !(head_seq_ == failed_seq_ && head_hash_ == failed_hash_)) {
    AddAuditSeqRange(found_, {known + 1, head_seq_});
    spdlog::warn(
        "audit chain {}: records {}-{} were added to the store by another writer; this "
        "broker continues after them but does not vouch for them",
        chain_id_, known + 1, head_seq_);
  }
  return absl::OkStatus();
}

void AddAuditSeqRange(std::vector<AuditSeqRange>& ranges, AuditSeqRange range) {
  if (!ranges.empty() && ranges.back().last + 1 >= range.first) {
    ranges.back().last = std::max(ranges.back().last, range.last);
  } else {
    ranges.push_back(range);
  }
  while (ranges.size() > kMaxAuditSeqRanges) {
    ranges[1].first = ranges[0].first;
    ranges.erase(ranges.begin());
  }
}

absl::Status AuditLog::Record(AuditEvent event) {
  std::vector<AuditEvent> one;
  one.push_back(std::move(event));
  return RecordAll(std::move(one));
}

absl::Status AuditLog::RecordAll(std::vector<AuditEvent> events) {
  if (events.empty()) return absl::OkStatus();
  Waiter self;
  self.records.reserve(events.size());
  const int64_t now = clock_.NowSeconds();
  for (AuditEvent& event : events) {
    store::AuditRecord& record = self.records.emplace_back();
    record.chain_id = chain_id_;
    record.time = now;
    record.event = std::move(event.event);
    record.outcome = std::move(event.outcome);
    record.spiffe_id = std::move(event.spiffe_id);
    record.node_id = std::move(event.node_id);
    record.task_id = std::move(event.task_id);
    record.credential_id = std::move(event.credential_id);
    record.detail = event.detail.empty() ? "{}" : std::move(event.detail);
    if (event.credential.has_value()) self.credentials.push_back(std::move(*event.credential));
  }
  const size_t mine = self.records.size();

  absl::MutexLock lock(&mu_);
  if (queued_records_ + mine > options_.max_queued) {
    failed_records_.fetch_add(static_cast<int64_t>(mine), std::memory_order_relaxed);
    return absl::UnavailableError("audit log backlog is full; the store is not keeping up");
  }
  queue_.push_back(&self);
  queued_records_ += mine;
  auto written_or_leading = [this, &self]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return self.done || queue_.front() == &self;
  };
  mu_.Await(absl::Condition(&written_or_leading));
  if (self.done) return self.status;

  // This caller leads: it writes its own records and those of the callers queued behind it (up
  // to max_batch records, its own always whole). It stays at the front while writing, so no
  // other caller leads meanwhile.
  size_t waiters = 0, records = 0;
  while (waiters < queue_.size() && !queue_[waiters]->head_check &&
         (waiters == 0 || records + queue_[waiters]->records.size() <= options_.max_batch)) {
    records += queue_[waiters]->records.size();
    ++waiters;
  }
  std::vector<store::AuditRecord> batch;
  batch.reserve(records);
  std::vector<store::IssuedCredential> credentials;
  for (size_t i = 0; i < waiters; ++i) {
    for (store::AuditRecord& r : queue_[i]->records) batch.push_back(std::move(r));
    for (store::IssuedCredential& c : queue_[i]->credentials) credentials.push_back(std::move(c));
  }
  mu_.Unlock();
  absl::Status status = WriteBatch(batch, credentials);
  if (!status.ok()) {
    spdlog::error("audit log: {} record(s) not stored, their requests fail: {}", records,
                  std::string(status.message()));
    status = absl::UnavailableError(absl::StrCat("audit record not stored: ", status.message()));
  }
  mu_.Lock();
  if (status.ok()) {
    stored_records_.fetch_add(static_cast<int64_t>(records), std::memory_order_relaxed);
    commits_.fetch_add(1, std::memory_order_relaxed);
  } else {
    failed_records_.fetch_add(static_cast<int64_t>(records), std::memory_order_relaxed);
  }
  queued_records_ -= records;
  for (size_t i = 0; i < waiters; ++i) {
    Waiter* w = queue_.front();
    queue_.pop_front();
    w->status = status;
    w->done = true;
  }
  // Unlocking wakes the callers written for, and the next one in line, which leads next.
  return status;
}

absl::Status AuditLog::WriteBatch(std::vector<store::AuditRecord>& records,
                                  const std::vector<store::IssuedCredential>& credentials) {
  if (head_stale_) RETURN_IF_ERROR(ReloadStaleHead());
  int64_t seq = head_seq_;
  const std::string* prev = &head_hash_;
  for (store::AuditRecord& r : records) {
    r.seq = ++seq;
    r.prev_hash = *prev;
    r.hash = AuditRecordHash(r);
    prev = &r.hash;
  }
  absl::Status status = store_.AppendAuditBatch(records, credentials);
  if (!status.ok()) {
    // Perhaps nothing was stored, perhaps another writer moved the chain: ask the store again.
    head_stale_ = true;
    failed_seq_ = seq;
    failed_hash_ = records.back().hash;
    return status;
  }
  head_seq_ = seq;
  head_hash_ = records.back().hash;
  return absl::OkStatus();
}

absl::Status AuditLog::CheckStoredHead(Head* head) {
  Waiter self;
  self.head_check = true;
  absl::MutexLock lock(&mu_);
  queue_.push_back(&self);
  auto leading = [this, &self]()
                     ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return queue_.front() == &self; };
  mu_.Await(absl::Condition(&leading));
  // At the front: no batch is being written until this one leaves the queue.
  mu_.Unlock();
  absl::Status status = CompareStoredHead();
  Head held{.seq = head_seq_, .hash = head_hash_, .found = found_};
  mu_.Lock();
  queue_.pop_front();
  if (status.ok() && head != nullptr) *head = std::move(held);
  return status;
}

absl::Status AuditLog::CompareStoredHead() {
  absl::StatusOr<store::AuditRecord> last = store_.LastAuditRecord(chain_id_);
  if (!last.ok() && !absl::IsNotFound(last.status())) return last.status();
  const int64_t stored_seq = last.ok() ? last->seq : 0;
  if (stored_seq < head_seq_) {
    if (stored_seq == 0) {
      return absl::DataLossError(absl::StrCat("audit chain ", chain_id_,
                                              " of this broker is missing from the store (this "
                                              "broker holds its head at record ",
                                              head_seq_, "; deleted?)"));
    }
    return absl::DataLossError(absl::StrCat("audit chain ", chain_id_, " ends at record ",
                                            stored_seq, " in the store, behind record ", head_seq_,
                                            " which this broker holds as its head (cut?)"));
  }
  // After a failed write the batch may or may not have been stored (head_stale_): the store may
  // then be ahead, but must still hold the head this broker knew before it.
  if (stored_seq > head_seq_ && !head_stale_) {
    return absl::DataLossError(absl::StrCat("audit chain ", chain_id_, " goes on to record ",
                                            stored_seq, " in the store, past record ", head_seq_,
                                            " which this broker wrote last (records added?)"));
  }
  if (head_seq_ == 0) return absl::OkStatus();
  std::string stored_hash;
  if (stored_seq == head_seq_) {
    stored_hash = std::move(last->hash);
  } else {
    store::AuditQuery query;
    query.chain_id = chain_id_;
    query.after_seq = head_seq_ - 1;
    query.limit = 1;
    ASSIGN_OR_RETURN(std::vector<store::AuditRecord> at_head, store_.ListAuditRecords(query));
    if (!at_head.empty() && at_head.front().seq == head_seq_) {
      stored_hash = std::move(at_head.front().hash);
    }
  }
  if (stored_hash != head_hash_) {
    return absl::DataLossError(absl::StrCat("audit chain ", chain_id_, ": record ", head_seq_,
                                            " in the store is not the one this broker wrote "
                                            "(hash differs; rewritten?)"));
  }
  return absl::OkStatus();
}

AuditLog::Stats AuditLog::stats() const {
  return {.records = stored_records_.load(std::memory_order_relaxed),
          .batches = commits_.load(std::memory_order_relaxed),
          .failed = failed_records_.load(std::memory_order_relaxed)};
}

absl::StatusOr<AuditChainReport> VerifyAuditChain(store::Store& store,
                                                  const std::string& chain_id) {
  AuditChainReport report;
  report.chain_id = chain_id;
  store::AuditQuery query;
  query.chain_id = chain_id;
  query.limit = kVerifyPage;
  while (true) {
    query.after_seq = report.records;
    ASSIGN_OR_RETURN(std::vector<store::AuditRecord> page, store.ListAuditRecords(query));
    for (const store::AuditRecord& r : page) {
      const int64_t expected = report.records + 1;
      if (r.seq != expected) {
        report.status = absl::DataLossError(
            absl::StrCat("audit chain ", chain_id, ": record ", expected, " is missing"));
        return report;
      }
      if (r.prev_hash != report.head_hash) {
        report.status = absl::DataLossError(absl::StrCat("audit chain ", chain_id, ": record ",
                                                         r.seq, " does not follow record ",
                                                         r.seq - 1, " (prev_hash differs)"));
        return report;
      }
      if (AuditRecordHash(r) != r.hash) {
        report.status = absl::DataLossError(absl::StrCat("audit chain ", chain_id, ": record ",
                                                         r.seq, " was altered (hash differs)"));
        return report;
      }
      report.records = r.seq;
      report.head_hash = r.hash;
    }
    if (static_cast<int64_t>(page.size()) < kVerifyPage) return report;
  }
}

absl::StatusOr<std::string> LoadOrCreateAuditChainId(const std::string& data_dir) {
  const std::string path = (std::filesystem::path(data_dir) / kChainIdFile).string();
  std::error_code ec;
  if (std::filesystem::exists(path, ec)) {
    ASSIGN_OR_RETURN(std::string contents, crypto::ReadFile(path));
    std::string id(absl::StripAsciiWhitespace(contents));
    if (!IsChainId(id)) {
      return absl::FailedPreconditionError(
          absl::StrCat("'", path, "' does not hold an audit chain id (1-64 of [A-Za-z0-9_-])"));
    }
    return id;
  }
  ASSIGN_OR_RETURN(std::string random, crypto::RandomBytes(8));
  std::string id = absl::StrCat("broker-", crypto::HexEncode(random));
  RETURN_IF_ERROR(crypto::WriteFileAtomic(path, id + "\n"));
  return id;
}

}  // namespace mandate::broker
