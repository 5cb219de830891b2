// Shared pieces of the task and token integration tests: a broker and an attested agent with an
// entry for this test process that is entitled to task scopes, and HTTP helpers for /token.
#ifndef MANDATE_TESTS_INTEGRATION_TASKS_FIXTURE_H_
#define MANDATE_TESTS_INTEGRATION_TASKS_FIXTURE_H_

#include <httplib.h>

#include <nlohmann/json.hpp>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "broker/common/jose/jose.h"
#include "tests/integration/harness.h"

namespace mandate::integration {

using json = nlohmann::json;

// The payload of a compact JWS, unverified (null JSON when malformed).
inline nlohmann::json PayloadOf(const std::string& token) {
  std::vector<std::string> parts = absl::StrSplit(token, '.');
  if (parts.size() != 3) return json();
  auto decoded = jose::Base64UrlDecode(parts[1]);
  if (!decoded.ok()) return json();
  return json::parse(*decoded, nullptr, false);
}

struct TokenHttpAnswer {
  int status = 0;
  nlohmann::json body;
  std::string dpop_nonce;
};

// POST /token with a real HTTP client: form `params`, one DPoP header per element of `proofs`.
inline TokenHttpAnswer PostToken(const std::string& http_address,
                                 const std::vector<std::pair<std::string, std::string>>& params,
                                 const std::vector<std::string>& proofs) {
  std::vector<std::string> host_port = absl::StrSplit(http_address, ':');
  httplib::Client http(host_port.at(0), std::stoi(host_port.at(1)));
  http.set_connection_timeout(5);
  http.set_read_timeout(10);
  httplib::Headers headers;
  for (const auto& p : proofs) headers.emplace("DPoP", p);
  httplib::Params form(params.begin(), params.end());
  auto result = http.Post("/token", headers, form);
  if (!result) return {};
  return {result->status, json::parse(result->body, nullptr, false),
          result->get_header_value("DPoP-Nonce")};
}

// RFC 8693 parameters exchanging `jwt_svid` for a token of task `task_id`.
inline std::vector<std::pair<std::string, std::string>> ExchangeParams(const std::string& jwt_svid,
                                                                       const std::string& task_id) {
  return {{"grant_type", "urn:ietf:params:oauth:grant-type:token-exchange"},
          {"subject_token", jwt_svid},
          {"subject_token_type", "urn:ietf:params:oauth:token-type:jwt"},
          {"task_id", task_id}};
}

class TasksFixture : public IntegrationTest {
 protected:
  // Entry with task-scope entitlements (the harness's CreateEntry has no --scope).
  absl::StatusOr<std::string> CreateScopedEntry(const std::string& id, const std::string& selector,
                                                const std::vector<std::string>& scopes) {
    std::vector<std::string> args = {"--output",    "json",
                                     "entry",       "create",
                                     "--parent-id", broker_.JoinNodeId("node-tasks"),
                                     "--spiffe-id", id,
                                     "--selector",  selector};
    for (const auto& s : scopes) args.insert(args.end(), {"--scope", s});
    CommandResult r = Admin(broker_, args);
    json created = json::parse(r.out, nullptr, false);
    if (r.exit_code != 0 || !created.is_object() || !created.contains("id") ||
        !created["id"].is_string()) {
      return absl::InternalError(absl::StrCat("entry create failed: ", r.out, r.err));
    }
    return created["id"].get<std::string>();
  }

  void StartAll(BrokerOptions options = {}) {
    auto broker = StartBroker(std::move(options));
    ASSERT_TRUE(broker.ok()) << broker.status();
    broker_ = *broker;
    auto agent = StartAttestedAgent(broker_, "node-tasks");
    ASSERT_TRUE(agent.ok()) << agent.status();
    agent_ = *agent;
    spiffe_id_ = broker_.Id("/agent/tasks");
    auto entry = CreateScopedEntry(spiffe_id_, OwnUidSelector(), {"tickets:read", "tickets:write"});
    ASSERT_TRUE(entry.ok()) << entry.status();
    // Wait until the agent serves the new entry.
    ASSERT_TRUE(WaitUntil(
        [&] {
          return Workload(agent_, {"fetch", "jwt", "--audience", "x"}).exit_code == 0;
        },
        15s, 100ms));
  }
  BrokerProcess broker_;
  AgentProcess agent_;
  std::string spiffe_id_;
};

}  // namespace mandate::integration

#endif  // MANDATE_TESTS_INTEGRATION_TASKS_FIXTURE_H_
