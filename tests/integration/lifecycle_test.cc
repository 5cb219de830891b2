// Daemon lifecycle against real processes: restarts (clean and kill -9), agent restarts without a
// token, entry deletion, eviction and banning reaching the agent, and SIGTERM draining.
#include <gmock/gmock.h>
#include <gtest/gtest.h>
#include <httplib.h>
#include <signal.h>
#include <sys/stat.h>

#include <cinttypes>
#include <cstdio>
#include <iostream>
#include <regex>

#include "mandate/svid.h"
#include "mandate/workload_client.h"
#include "nlohmann/json.hpp"
#include "tests/integration/harness.h"

namespace mandate::integration {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

class LifecycleTest : public IntegrationTest {
 protected:
  // The Workload API connection goes first: an idle client connection holds the agent's gRPC
  // shutdown until its 3 s deadline, which would only slow every test down.
  void TearDown() override {
    client_.reset();
    IntegrationTest::TearDown();
  }

  // Broker + agent attested as `node_name` + an entry for this process's uid, served (polled)
  // before returning.
  void StartServedWorkload(const std::string& node_name, BrokerOptions broker_options = {}) {
    auto broker = StartBroker(std::move(broker_options));
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *broker;
    auto agent = StartAttestedAgent(broker_, node_name);
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *agent;
    node_id_ = broker_.JoinNodeId(node_name);
    workload_id_ = broker_.Id("/agent/" + node_name);
    auto entry = CreateEntry(broker_, node_id_, workload_id_, {OwnUidSelector()});
    ASSERT_TRUE(entry.ok()) << entry.status();
    entry_id_ = *entry;
    auto client = WorkloadClient::Connect("unix://" + agent_.socket);
    ASSERT_TRUE(client.ok()) << client.status();
    client_ = std::move(*client);
    absl::StatusOr<X509Svid> svid = absl::UnknownError("not fetched");
    ASSERT_TRUE(WaitUntil(
        [&] {
          svid = client_->FetchX509Svid();
          return svid.ok();
        },
        10s, 50ms))
        << svid.status();
    ASSERT_EQ(svid->spiffe_id, workload_id_);
  }

  json AdminJson(const std::vector<std::string>& args) {
    std::vector<std::string> with_output = {"--output", "json"};
    with_output.insert(with_output.end(), args.begin(), args.end());
    CommandResult r = Admin(broker_, with_output);
    EXPECT_EQ(r.exit_code, 0) << r;
    return json::parse(r.out, nullptr, false);
  }

  json FindAgent(const std::string& spiffe_id) {
    json list = AdminJson({"agent", "list"});
    if (!list.is_object() || !list["agents"].is_array()) return nullptr;
    for (const json& agent : list["agents"]) {
      if (agent.value("spiffe_id", "") == spiffe_id) return agent;
    }
    return nullptr;
  }

  // Polls the Workload API (every 20 ms) until a fetch fails, within `deadline` (generous: the
  // outcome is what is tested here; how fast it comes is measured by the benchmark's
  // revocation_propagation). Returns how long it took, printed for the log, or -1 ms if the
  // fetch never failed. `*first_refusal` is the first failure seen: its code is what the test
  // holds against docs/api.md, so a different error on the way cannot pass unnoticed.
  std::chrono::milliseconds TimeUntilRefused(std::chrono::milliseconds deadline,
                                             absl::Status* first_refusal) {
    auto start = std::chrono::steady_clock::now();
    bool refused = WaitUntil(
        [&] {
          *first_refusal = client_->FetchX509Svid().status();
          return !first_refusal->ok();
        },
        deadline, 20ms);
    if (!refused) return -1ms;
    return std::chrono::duration_cast<std::chrono::milliseconds>(std::chrono::steady_clock::now() -
                                                                 start);
  }

  BrokerProcess broker_;
  AgentProcess agent_;
  std::string node_id_;
  std::string workload_id_;
  std::string entry_id_;
  std::unique_ptr<WorkloadClient> client_;
};

// An HTTP client for `broker`'s HTTP listener.
httplib::Client BrokerHttp(const BrokerProcess& broker) {
  const std::string& address = broker.http_address;
  return httplib::Client(address.substr(0, address.rfind(':')),
                         std::stoi(address.substr(address.rfind(':') + 1)));
}

bool Exists(const std::string& path) {
  struct stat st {};
  return ::lstat(path.c_str(), &st) == 0;
}

TEST_F(LifecycleTest, BrokerRestartKeepsEntriesNodesAndKeysAndAgentKeepsWorking) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-restart"));
  auto other = CreateEntry(broker_, node_id_, broker_.Id("/agent/someone-else"), {"unix:uid:4242"});
  ASSERT_TRUE(other.ok()) << other.status();
  const json entries_before = AdminJson({"entry", "list"});
  const json agents_before = AdminJson({"agent", "list"});
  const json bundle_before = AdminJson({"bundle", "show"});
  ASSERT_EQ(entries_before["entries"].size(), 2u) << entries_before.dump();
  ASSERT_EQ(agents_before["agents"].size(), 1u) << agents_before.dump();

  ASSERT_EQ(StopProcess(broker_.pid, SIGTERM), 0);
  // The same ports, so that the still-running agent finds the broker again.
  BrokerOptions same_ports;
  same_ports.agent_listen = broker_.agent_address;
  same_ports.http_listen = broker_.http_address;
  auto restarted = StartBroker(same_ports);
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  broker_ = *restarted;

  EXPECT_EQ(AdminJson({"entry", "list"}), entries_before);
  EXPECT_EQ(AdminJson({"agent", "list"}), agents_before);
  // Same CA certificate and JWT key.
  EXPECT_EQ(AdminJson({"bundle", "show"}), bundle_before);

  // The agent reconnects by itself: a new entry reaches it and gets an SVID signed by the
  // restarted broker, and a JWT-SVID for a new audience is minted by it.
  const std::string new_id = broker_.Id("/agent/after-restart");
  auto added = CreateEntry(broker_, node_id_, new_id, {OwnUidSelector()});
  ASSERT_TRUE(added.ok()) << added.status();
  absl::StatusOr<X509Context> context = absl::UnknownError("not fetched");
  ASSERT_TRUE(WaitUntil(
      [&] {
        context = client_->FetchX509Context();
        return context.ok() && context->svids.size() == 2;
      },
      10s, 50ms))
      << context.status();
  auto jwt = client_->FetchJwtSvid({"fresh-audience-after-restart"}, new_id);
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  EXPECT_EQ(jwt->spiffe_id, new_id);
  EXPECT_TRUE(IsRunning(agent_.pid));
}

TEST_F(LifecycleTest, BrokerKilledRightAfterAcknowledgedWritesLosesNothing) {
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  broker_ = *broker;
  auto token = GenerateJoinToken(broker_, "node-k9");
  ASSERT_TRUE(token.ok()) << token.status();
  auto entry = CreateEntry(broker_, broker_.JoinNodeId("node-k9"), broker_.Id("/agent/k9"),
                           {OwnUidSelector()});
  ASSERT_TRUE(entry.ok()) << entry.status();
  // No grace: SIGKILL the moment `entry create` returned.
  EXPECT_EQ(StopProcess(broker_.pid, SIGKILL), 128 + SIGKILL);

  auto restarted = StartBroker();
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  broker_ = *restarted;
  json entries = AdminJson({"entry", "list"});
  ASSERT_EQ(entries["entries"].size(), 1u) << entries.dump();
  EXPECT_EQ(entries["entries"][0]["id"], *entry);
  EXPECT_EQ(entries["entries"][0]["spiffe_id"], broker_.Id("/agent/k9"));
  // The join token acknowledged before the kill still works, and the entry is served.
  auto agent = StartAgent(broker_, *token);
  ASSERT_TRUE(agent.ok()) << agent.status();
  CommandResult fetch;
  ASSERT_TRUE(WaitUntil(
      [&] {
        fetch = Workload(*agent, {"fetch", "x509"});
        return fetch.exit_code == 0;
      },
      10s, 50ms))
      << fetch;
  EXPECT_THAT(fetch.out, HasSubstr(broker_.Id("/agent/k9")));
}

// Every issuance leaves an audit record that is on disk before the workload has its credential:
// kill -9 right after the fetch returns loses none, and `audit verify` finds a record edited in
// the database file.
TEST_F(LifecycleTest, IssuancesAreAuditedDurablyAndTamperingIsFound) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-audit"));
  const std::string audience = "https://audit.example.org/" + std::to_string(::getpid());
  auto jwt = client_->FetchJwtSvid({audience});
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  {
    // The broker's counters: node SVID, workload X509-SVID, JWT-SVID at least.
    httplib::Client http = BrokerHttp(broker_);
    auto metrics = http.Get("/metrics");
    ASSERT_TRUE(metrics);
    EXPECT_EQ(metrics->status, 200);
    EXPECT_THAT(metrics->get_header_value("Content-Type"), HasSubstr("text/plain"));
    std::smatch m;
    ASSERT_TRUE(
        std::regex_search(metrics->body, m, std::regex("\nmandate_audit_records_total (\\d+)\n")))
        << metrics->body;
    EXPECT_GE(std::stoll(m[1]), 3);
    EXPECT_THAT(metrics->body, HasSubstr("\nmandate_audit_failed_total 0\n"));
  }
  client_.reset();
  EXPECT_EQ(StopProcess(broker_.pid, SIGKILL), 128 + SIGKILL);

  auto restarted = StartBroker({.data_dir = broker_.data_dir});
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  broker_ = *restarted;
  json list = AdminJson({"audit", "list", "--spiffe-id", workload_id_});
  ASSERT_TRUE(list["records"].is_array()) << list.dump();
  json minted = nullptr;
  bool x509_seen = false;
  for (const json& r : list["records"]) {
    if (r["event"] == "x509_svid" && r["outcome"] == "issued") x509_seen = true;
    if (r["event"] == "jwt_svid" && r["detail"]["aud"] == json::array({audience})) minted = r;
  }
  EXPECT_TRUE(x509_seen) << list.dump();
  ASSERT_TRUE(minted.is_object()) << list.dump();
  EXPECT_EQ(minted["node_id"], node_id_);
  EXPECT_EQ(minted["detail"]["entry_id"], entry_id_);
  // The record names the credential without holding it.
  EXPECT_EQ(list.dump().find(jwt->token), std::string::npos);
  json by_jti = AdminJson({"audit", "list", "--jti", minted["credential_id"].get<std::string>()});
  ASSERT_EQ(by_jti["records"].size(), 1u) << by_jti.dump();

  json verified = AdminJson({"audit", "verify"});
  EXPECT_EQ(verified["intact"], true) << verified.dump();
  ASSERT_EQ(verified["chains"].size(), 1u);
  EXPECT_GE(verified["chains"][0]["records"].get<int64_t>(), 3);  // node, x509, jwt

  // Edit the minted record behind the broker's back.
  CommandResult edit =
      TamperWithStore(broker_,
                      "UPDATE audit_log SET spiffe_id = 'spiffe://example.org/someone-else' "
                      "WHERE credential_id = ?",
                      minted["credential_id"].get<std::string>());
  ASSERT_EQ(edit.exit_code, 0) << edit;
  CommandResult broken = Admin(broker_, {"audit", "verify"});
  EXPECT_NE(broken.exit_code, 0) << broken;
  EXPECT_THAT(broken.out, HasSubstr("BROKEN"));
  EXPECT_THAT(broken.out, HasSubstr("was altered"));
}

// Signed checkpoints of the audit chain are published and kept; a chain cut behind the broker's
// back still links up, but no longer holds what the checkpoint names.
TEST_F(LifecycleTest, AuditCheckpointsArePublishedAndCatchACutTail) {
  BrokerOptions options;
  options.extra_args = {"--audit-checkpoint-interval", "1"};
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-ckpt", options));
  ASSERT_TRUE(client_->FetchJwtSvid({"https://ckpt.example.org"}).ok());
  httplib::Client http = BrokerHttp(broker_);
  json checkpoint;
  ASSERT_TRUE(WaitUntil(
      [&] {
        auto response = http.Get("/audit/checkpoints");
        if (!response || response->status != 200) return false;
        json doc = json::parse(response->body, nullptr, false);
        if (!doc.is_object() || doc["checkpoints"].empty()) return false;
        checkpoint = doc["checkpoints"][0];
        return checkpoint["seq"].get<int64_t>() >= 4;  // node, entry, x509, jwt
      },
      5s, 100ms))
      << checkpoint.dump();
  // A compact JWS whose header names the checkpoint type (its signature is checked by verify).
  std::string jws = checkpoint["jws"];
  EXPECT_EQ(std::count(jws.begin(), jws.end(), '.'), 2);
  json verified = AdminJson({"audit", "verify"});
  ASSERT_EQ(verified["chains"].size(), 1u) << verified.dump();
  EXPECT_EQ(verified["intact"], true) << verified.dump();
  EXPECT_GE(verified["chains"][0]["checkpoints"].get<int64_t>(), 1);

  // Cut the chain's tail back to before the checkpointed record.
  const int64_t cut_after = checkpoint["seq"].get<int64_t>() - 1;
  CommandResult cut = TamperWithStore(
      broker_, "DELETE FROM audit_log WHERE seq > CAST(? AS INTEGER)", std::to_string(cut_after));
  ASSERT_EQ(cut.exit_code, 0) << cut;
  CommandResult broken = Admin(broker_, {"audit", "verify"});
  EXPECT_NE(broken.exit_code, 0) << broken;
  EXPECT_THAT(broken.out, HasSubstr("BROKEN"));
  EXPECT_THAT(broken.out, HasSubstr("which a signed checkpoint names"));
}

// Appends `records` invented records to audit chain `chain_id` (a new chain, or after the stored
// head of an existing one) in `broker`'s store behind its back, self-consistent: hashed exactly as
// the broker hashes (AuditRecordHash). Prints the first and last seq it wrote.
CommandResult FabricateAuditChain(const BrokerProcess& broker, const std::string& chain_id,
                                  int records) {
  static constexpr char kScript[] = R"py(
import hashlib, sqlite3, sys
db, chain, n = sys.argv[1], sys.argv[2], int(sys.argv[3])
fields = ["chain_id", "seq", "time", "event", "outcome", "spiffe_id", "node_id", "task_id",
          "credential_id", "detail", "prev_hash"]
c = sqlite3.connect(db)
head = c.execute("SELECT seq, hash FROM audit_log WHERE chain_id = ? ORDER BY seq DESC LIMIT 1",
                 (chain,)).fetchone()
start, prev = (head[0], head[1]) if head else (0, "")
print(start + 1, start + n)
for seq in range(start + 1, start + n + 1):
    r = {"chain_id": chain, "seq": seq, "time": 1800000000, "event": "jwt_svid",
         "outcome": "issued", "spiffe_id": "spiffe://example.org/invented", "node_id": "",
         "task_id": "", "credential_id": "forged-%d" % seq, "detail": "{}", "prev_hash": prev}
    enc = b"mandate-audit-v1;"
    for f in fields:
        v = str(r[f]).encode()
        enc += str(len(v)).encode() + b":" + v + b";"
    r["hash"] = hashlib.sha256(enc).hexdigest()
    cols = fields + ["hash"]
    c.execute("INSERT INTO audit_log (%s) VALUES (%s)" % (",".join(cols), ",".join("?" * len(cols))),
              [r[f] for f in cols])
    prev = r["hash"]
c.commit()
)py";
  return RunCommand({"/usr/bin/python3", "-c", kScript, broker.data_dir + "/mandate.db", chain_id,
                     std::to_string(records)});
}

// `audit verify` vouches only for what it can check: a fabricated chain under a new chain ID
// (self-consistent, so it links up) is reported unverified, and this broker's own chain must be
// in the store up to the head the running broker holds (cut or deleted: refused).
TEST_F(LifecycleTest, AuditVerifyRefusesAFabricatedChainAndACutOrDeletedOwnChain) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-forge"));
  ASSERT_TRUE(client_->FetchJwtSvid({"https://forge.example.org"}).ok());
  json verified = AdminJson({"audit", "verify"});
  EXPECT_EQ(verified["intact"], true) << verified.dump();
  ASSERT_EQ(verified["chains"].size(), 1u) << verified.dump();
  const std::string own_chain = verified["chains"][0]["chain_id"];
  EXPECT_EQ(verified["chains"][0]["this_broker"], true) << verified.dump();
  const int64_t head = verified["chains"][0]["records"];
  EXPECT_EQ(verified["chains"][0]["covered_seq"], head) << verified.dump();

  const std::string forged = "broker-0123456789abcdef";
  CommandResult inserted = FabricateAuditChain(broker_, forged, 3);
  ASSERT_EQ(inserted.exit_code, 0) << inserted;
  json listed = AdminJson({"audit", "list", "--spiffe-id", "spiffe://example.org/invented"});
  ASSERT_EQ(listed["records"].size(), 3u) << "the forgery is in the store: " << listed.dump();
  CommandResult refused = Admin(broker_, {"audit", "verify"});
  EXPECT_NE(refused.exit_code, 0) << refused;
  EXPECT_THAT(refused.out, HasSubstr("chain " + forged + ": UNVERIFIED")) << refused;
  EXPECT_THAT(refused.err, HasSubstr(forged)) << refused;
  EXPECT_THAT(refused.out, HasSubstr("chain " + own_chain + " (this broker): " +
                                     std::to_string(head) + " records, intact"))
      << refused;

  // Without the forgery the store verifies again.
  ASSERT_EQ(TamperWithStore(broker_, "DELETE FROM audit_log WHERE chain_id = ?", forged).exit_code,
            0);
  EXPECT_EQ(AdminJson({"audit", "verify"})["intact"], true);

  // No checkpoint was signed yet (default interval 60 s): only the running broker's head shows
  // that the chain's last record was cut.
  CommandResult cut = TamperWithStore(
      broker_, "DELETE FROM audit_log WHERE seq = CAST(? AS INTEGER)", std::to_string(head));
  ASSERT_EQ(cut.exit_code, 0) << cut;
  CommandResult behind = Admin(broker_, {"audit", "verify"});
  EXPECT_NE(behind.exit_code, 0) << behind;
  EXPECT_THAT(behind.out, HasSubstr("BROKEN")) << behind;
  EXPECT_THAT(behind.out, HasSubstr("behind record " + std::to_string(head))) << behind;
  EXPECT_THAT(behind.err, HasSubstr(own_chain)) << behind;

  // The whole chain deleted: the broker's own chain is required.
  ASSERT_EQ(
      TamperWithStore(broker_, "DELETE FROM audit_log WHERE chain_id = ?", own_chain).exit_code, 0);
  CommandResult missing = Admin(broker_, {"audit", "verify"});
  EXPECT_NE(missing.exit_code, 0) << missing;
  EXPECT_THAT(missing.out, HasSubstr("chain " + own_chain + " (this broker): BROKEN")) << missing;
  EXPECT_THAT(missing.out, HasSubstr("missing from the store")) << missing;
}

// Records appended to the broker's own chain while it is stopped (after the checkpoint it signs
// at a clean shutdown) link up, but the restarted broker does not vouch for them: `audit verify`
// names the range, warns, and fails with --strict.
TEST_F(LifecycleTest, AuditVerifyDoesNotVouchForRecordsForgedWhileTheBrokerWasStopped) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-tail"));
  ASSERT_TRUE(client_->FetchJwtSvid({"https://tail.example.org"}).ok());
  json before = AdminJson({"audit", "verify"});
  ASSERT_EQ(before["chains"].size(), 1u) << before.dump();
  const std::string own_chain = before["chains"][0]["chain_id"];
  EXPECT_EQ(before["chains"][0]["not_vouched"], json::array()) << before.dump();

  client_.reset();
  ASSERT_EQ(StopProcess(agent_.pid, SIGTERM), 0);
  ASSERT_EQ(StopProcess(broker_.pid, SIGTERM), 0);  // signs its final head
  CommandResult forged = FabricateAuditChain(broker_, own_chain, 3);
  ASSERT_EQ(forged.exit_code, 0) << forged;
  int64_t first = 0, last = 0;
  ASSERT_EQ(std::sscanf(forged.out.c_str(), "%" SCNd64 " %" SCNd64, &first, &last), 2) << forged;
  ASSERT_EQ(last, first + 2);
  auto restarted = StartBroker({.data_dir = broker_.data_dir});
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  broker_ = *restarted;

  const std::string range = std::to_string(first) + "-" + std::to_string(last);
  CommandResult warned = Admin(broker_, {"audit", "verify"});
  EXPECT_EQ(warned.exit_code, 0) << "a warning by default: " << warned;
  EXPECT_THAT(warned.out, HasSubstr("chain " + own_chain +
                                    " (this broker): " + std::to_string(last) + " records, intact"))
      << warned;
  EXPECT_THAT(warned.out, HasSubstr("vouched for except " + range)) << warned;
  EXPECT_THAT(warned.out, HasSubstr("WARNING: chain " + own_chain + ": records " + range +
                                    " are NOT VOUCHED FOR"))
      << warned;
  json verified = AdminJson({"audit", "verify"});
  EXPECT_EQ(verified["intact"], true) << verified.dump();
  EXPECT_EQ(verified["vouched"], false) << verified.dump();
  EXPECT_EQ(verified["chains"][0]["not_vouched"], json::array({json::array({first, last})}))
      << verified.dump();
  CommandResult strict = Admin(broker_, {"audit", "verify", "--strict"});
  EXPECT_NE(strict.exit_code, 0) << strict;
  EXPECT_THAT(strict.err, HasSubstr("--strict")) << strict;

  // A clean stop and start with nothing added: the range stays reported (the checkpoint signed
  // at the stop lists it), and nothing else joins it.
  ASSERT_EQ(StopProcess(broker_.pid, SIGTERM), 0);
  restarted = StartBroker({.data_dir = broker_.data_dir});
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  broker_ = *restarted;
  verified = AdminJson({"audit", "verify"});
  EXPECT_EQ(verified["intact"], true) << verified.dump();
  EXPECT_EQ(verified["chains"][0]["not_vouched"], json::array({json::array({first, last})}))
      << verified.dump();
}

TEST_F(LifecycleTest, AgentRestartWithoutTokenServesAgain) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-again"));
  const json agent_before = FindAgent(node_id_);
  ASSERT_TRUE(agent_before.is_object());

  // client_ keeps an idle connection to the agent here; the agent lets it go only at its 3 s
  // gRPC shutdown deadline (see the measurement), still exiting 0.
  auto stop_start = std::chrono::steady_clock::now();
  ASSERT_EQ(StopProcess(agent_.pid, SIGTERM), 0);
  std::cout << "[ measured ] agent SIGTERM with an idle workload connection -> exit: "
            << std::chrono::duration_cast<std::chrono::milliseconds>(
                   std::chrono::steady_clock::now() - stop_start)
                   .count()
            << " ms\n";
  EXPECT_FALSE(Exists(agent_.socket)) << "a stopped agent leaves no socket behind";
  // No token at all (and MANDATE_JOIN_TOKEN is stripped from the child's environment).
  auto restarted = StartAgent(
      broker_, "", {.data_dir = agent_.data_dir, .socket = agent_.socket, .extra_args = {}});
  ASSERT_TRUE(restarted.ok()) << restarted.status();
  agent_ = *restarted;
  absl::StatusOr<X509Svid> svid = absl::UnknownError("not fetched");
  ASSERT_TRUE(WaitUntil(
      [&] {
        svid = client_->FetchX509Svid();
        return svid.ok();
      },
      10s, 50ms))
      << svid.status();
  EXPECT_EQ(svid->spiffe_id, workload_id_);
  auto jwt = client_->FetchJwtSvid({"after-agent-restart"});
  ASSERT_TRUE(jwt.ok()) << jwt.status();
  // It did not attest again: same node record, same agent SVID serial.
  EXPECT_EQ(FindAgent(node_id_), agent_before);
  EXPECT_THAT(ReadFileOrEmpty(agent_.log_path), HasSubstr("reusing stored agent SVID"));
}

TEST_F(LifecycleTest, EntryDeleteReachesAgent) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-delete"));
  CommandResult deleted = Admin(broker_, {"entry", "delete", entry_id_});
  ASSERT_EQ(deleted.exit_code, 0) << deleted;
  absl::Status refusal;
  auto took = TimeUntilRefused(15s, &refusal);
  std::cout << "[ measured ] refused on the agent " << took.count()
            << " ms after `entry delete` returned\n";
  RecordProperty("entry_delete_latency_ms", static_cast<int>(took.count()));
  ASSERT_GE(took.count(), 0) << "still served 15 s after entry delete";
  // docs/api.md: a caller that matches no entry gets PERMISSION_DENIED "no identity issued".
  EXPECT_TRUE(absl::IsPermissionDenied(refusal)) << refusal;
  EXPECT_THAT(refusal.message(), HasSubstr("no identity issued"));
  // The CLI sees the same.
  CommandResult fetch = Workload(agent_, {"fetch", "x509"});
  EXPECT_NE(fetch.exit_code, 0) << fetch;
  EXPECT_THAT(fetch.err, HasSubstr("no identity issued")) << fetch;
  EXPECT_EQ(AdminJson({"entry", "list"}), json({{"entries", json::array()}}));
}

TEST_F(LifecycleTest, AgentEvictStopsServingButAllowsReattestation) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-evict"));
  CommandResult evict = Admin(broker_, {"agent", "evict", node_id_});
  ASSERT_EQ(evict.exit_code, 0) << evict;
  absl::Status refusal;
  auto took = TimeUntilRefused(15s, &refusal);
  std::cout << "[ measured ] workloads refused " << took.count()
            << " ms after `agent evict` returned\n";
  ASSERT_GE(took.count(), 0) << "still served 15 s after evict";
  // docs/api.md: an agent that is not synchronised (evicted, banned) answers UNAVAILABLE, from
  // the first refusal on, and keeps doing so.
  EXPECT_TRUE(absl::IsUnavailable(refusal)) << refusal;
  EXPECT_THAT(refusal.message(), HasSubstr("not synchronised with the broker"));
  absl::Status still = client_->FetchX509Svid().status();
  EXPECT_TRUE(absl::IsUnavailable(still)) << still;
  EXPECT_TRUE(FindAgent(node_id_).is_null()) << "evicted node still listed";

  // Evicting is not banning: a fresh token for the same node ID attests again (fresh data dir,
  // since the old agent SVID is no longer recognised) and serves the same entry.
  auto token = GenerateJoinToken(broker_, "node-evict");
  ASSERT_TRUE(token.ok()) << token.status();
  auto again = StartAgent(broker_, *token,
                          {.data_dir = temp_dir() + "/agent2",
                           .socket = temp_dir() + "/run/a2.sock",
                           .extra_args = {}});
  ASSERT_TRUE(again.ok()) << again.status();
  json listed = FindAgent(node_id_);
  ASSERT_TRUE(listed.is_object());
  EXPECT_EQ(listed["banned"], false);
  CommandResult fetch;
  ASSERT_TRUE(WaitUntil(
      [&] {
        fetch = Workload(*again, {"fetch", "x509"});
        return fetch.exit_code == 0;
      },
      10s, 50ms))
      << fetch;
  EXPECT_THAT(fetch.out, HasSubstr(workload_id_));
}

TEST_F(LifecycleTest, AgentBanStopsServingAndRefusesReattestation) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-ban"));
  CommandResult ban = Admin(broker_, {"agent", "ban", node_id_});
  ASSERT_EQ(ban.exit_code, 0) << ban;
  absl::Status refusal;
  auto took = TimeUntilRefused(15s, &refusal);
  std::cout << "[ measured ] workloads refused " << took.count()
            << " ms after `agent ban` returned\n";
  ASSERT_GE(took.count(), 0) << "still served 15 s after ban";
  // docs/api.md: an agent that is not synchronised (evicted, banned) answers UNAVAILABLE, from
  // the first refusal on, and keeps doing so.
  EXPECT_TRUE(absl::IsUnavailable(refusal)) << refusal;
  EXPECT_THAT(refusal.message(), HasSubstr("not synchronised with the broker"));
  absl::Status still = client_->FetchX509Svid().status();
  EXPECT_TRUE(absl::IsUnavailable(still)) << still;
  CommandResult fetch = Workload(agent_, {"fetch", "x509"});
  EXPECT_NE(fetch.exit_code, 0) << fetch;
  json listed = FindAgent(node_id_);
  ASSERT_TRUE(listed.is_object()) << "a banned node stays listed";
  EXPECT_EQ(listed["banned"], true);

  // A fresh token for the banned node ID is issued but refused at attestation.
  auto token = GenerateJoinToken(broker_, "node-ban");
  ASSERT_TRUE(token.ok()) << token.status();
  CommandResult again = RunAgentUntilExit(broker_, *token,
                                          {.data_dir = temp_dir() + "/agent2",
                                           .socket = temp_dir() + "/run/a2.sock",
                                           .extra_args = {}});
  EXPECT_NE(again.exit_code, 0) << again;
  EXPECT_NE(again.exit_code, -1) << "the agent did not exit: " << again;
  EXPECT_THAT(again.err, HasSubstr("banned"));
  const std::string broker_log = ReadFileOrEmpty(broker_.log_path);
  EXPECT_THAT(broker_log, HasSubstr("issuance refused kind=node_svid step=authorize"));
  EXPECT_THAT(broker_log, HasSubstr("node " + node_id_ + " is banned"));
  EXPECT_EQ(FindAgent(node_id_)["banned"], true);
}

TEST_F(LifecycleTest, SigtermDrainsAndExitsZeroForBothDaemons) {
  ASSERT_NO_FATAL_FAILURE(StartServedWorkload("node-term"));
  // Open streams on both daemons: the agent's sync stream on the broker, and a watch stream of
  // this process on the agent.
  std::atomic<int> updates{0};
  auto watcher = client_->WatchX509Context([&](const X509Context&) { ++updates; });
  ASSERT_TRUE(watcher->WaitUntilUpdated(10s).ok());
  // And a second workload connection that is open but idle, as long-lived SDK clients are.
  auto idle = WorkloadClient::Connect("unix://" + agent_.socket);
  ASSERT_TRUE(idle.ok()) << idle.status();
  ASSERT_TRUE((*idle)->FetchX509Svid().ok());

  auto start = std::chrono::steady_clock::now();
  EXPECT_EQ(StopProcess(broker_.pid, SIGTERM, 10s), 0);
  auto broker_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                       std::chrono::steady_clock::now() - start)
                       .count();
  std::cout << "[ measured ] broker SIGTERM -> exit: " << broker_ms << " ms\n";
  EXPECT_FALSE(Exists(broker_.admin_socket)) << "admin socket left behind";
  // The agent keeps serving from its cache while the broker is away.
  EXPECT_TRUE(client_->FetchX509Svid().ok());

  start = std::chrono::steady_clock::now();
  EXPECT_EQ(StopProcess(agent_.pid, SIGTERM, 10s), 0);
  auto agent_ms = std::chrono::duration_cast<std::chrono::milliseconds>(
                      std::chrono::steady_clock::now() - start)
                      .count();
  // An idle client connection is only let go at the agent's 3 s gRPC shutdown deadline
  // (broker/agent/main.cc); the exit is still clean.
  std::cout << "[ measured ] agent SIGTERM (open watch stream + idle connection) -> exit: "
            << agent_ms << " ms\n";
  EXPECT_FALSE(Exists(agent_.socket)) << "Workload API socket left behind";
  watcher->Close();
  EXPECT_GE(updates.load(), 1);
}

// cpp-httplib gives each connection a pool thread for as long as it is kept alive. With a pool
// smaller than the clients, the extra clients wait for an idle connection's keep-alive timeout
// (2 s): 32 keep-alive clients interleaving requests must all be answered within 1.5 s each.
TEST_F(LifecycleTest, BrokerHttpServesManyKeepAliveClientsAtOnce) {
  auto broker = StartBroker();
  ASSERT_TRUE(broker.ok()) << broker.status();
  std::string host = broker->http_address.substr(0, broker->http_address.rfind(':'));
  int port = std::stoi(broker->http_address.substr(broker->http_address.rfind(':') + 1));
  std::vector<std::unique_ptr<httplib::Client>> clients;
  for (int i = 0; i < 32; ++i) {
    clients.push_back(std::make_unique<httplib::Client>(host, port));
    clients.back()->set_keep_alive(true);
    clients.back()->set_read_timeout(1, 500000);
  }
  for (int round = 0; round < 2; ++round) {
    for (size_t i = 0; i < clients.size(); ++i) {
      auto response = clients[i]->Get("/healthz");
      ASSERT_TRUE(response) << "client " << i << " round " << round << ": "
                            << httplib::to_string(response.error());
      EXPECT_EQ(response->status, 200);
    }
  }
}

}  // namespace
}  // namespace mandate::integration
