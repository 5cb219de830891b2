#include "sdk/cli/cli.h"

#include <grpcpp/grpcpp.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <chrono>
#include <cstdint>
#include <cstring>
#include <exception>
#include <functional>
#include <iostream>
#include <memory>
#include <string>
#include <string_view>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/ascii.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/time/time.h"
#include "broker/common/crypto/keys.h"
#include "broker/common/registration/entry_rules.h"
#include "broker/common/spiffe/selector.h"
#include "broker/common/spiffe/spiffe_id.h"
#include "broker/common/util/status_macros.h"
#include "mandate/admin/v1/admin.grpc.pb.h"
#include "mandate/workload_client.h"
#include "nlohmann/json.hpp"

namespace mandate::cli {
namespace {

using nlohmann::json;
namespace adminpb = ::mandate::admin::v1;
namespace commonpb = ::mandate::common::v1;

constexpr auto kAdminCallTimeout = std::chrono::seconds(10);
constexpr char kAdminSocketHint[] = "(set --admin-socket or MANDATE_ADMIN_SOCKET)";

struct GlobalOptions {
  std::string admin_socket = kDefaultAdminSocket;
  std::string socket;  // empty: the SDK reads MANDATE_ENDPOINT_SOCKET / SPIFFE_ENDPOINT_SOCKET
  std::string output = "text";
};

// What a command handler writes to: results to `out`, progress notes to `err`.
struct Io {
  std::ostream& out;
  const GlobalOptions& global;
  std::ostream& err;
  bool json() const { return global.output == "json"; }
};

// ---------------------------------------------------------------------------- formatting

std::string Rfc3339(int64_t unix_seconds) {
  return absl::FormatTime("%Y-%m-%dT%H:%M:%SZ", absl::FromUnixSeconds(unix_seconds),
                          absl::UTCTimeZone());
}

json TimeJson(int64_t unix_seconds) {
  return unix_seconds == 0 ? json(nullptr) : json(Rfc3339(unix_seconds));
}

std::string TimeText(int64_t unix_seconds) {
  return unix_seconds == 0 ? "-" : Rfc3339(unix_seconds);
}

// Server-supplied text shown on a terminal: control characters are escaped so that a stored
// value cannot rewrite the operator's screen.
std::string Printable(std::string_view s) {
  std::string out;
  out.reserve(s.size());
  for (unsigned char c : s) {
    if (c < 0x20 || c == 0x7f) {
      out += absl::StrFormat("\\x%02x", c);
    } else {
      out += static_cast<char>(c);
    }
  }
  return out;
}

// JSON output never throws on invalid UTF-8 from the server: bad bytes become U+FFFD.
void PrintJson(std::ostream& out, const json& doc) {
  out << doc.dump(2, ' ', false, json::error_handler_t::replace) << "\n";
}

// As PrintJson with every non-ASCII character written as \uXXXX, for documents holding text an
// agent chose that a human decides on: a bidirectional override cannot reorder what is shown.
void PrintJsonAscii(std::ostream& out, const json& doc) {
  out << doc.dump(2, ' ', true, json::error_handler_t::replace) << "\n";
}

// Decodes one UTF-8 code point at s[*pos], advancing *pos; -1 (advancing one byte) when the
// bytes there are not UTF-8.
int32_t NextUtf8(std::string_view s, size_t* pos) {
  const unsigned char lead = static_cast<unsigned char>(s[*pos]);
  const size_t length = lead < 0x80             ? 1
                        : (lead & 0xE0) == 0xC0 ? 2
                        : (lead & 0xF0) == 0xE0 ? 3
                        : (lead & 0xF8) == 0xF0 ? 4
                                                : 0;
  if (length == 0 || s.size() - *pos < length) {
    ++*pos;
    return -1;
  }
  int32_t c = length == 1 ? lead : lead & (0x7F >> length);
  for (size_t k = 1; k < length; ++k) {
    const unsigned char next = static_cast<unsigned char>(s[*pos + k]);
    if ((next & 0xC0) != 0x80) {
      ++*pos;
      return -1;
    }
    c = (c << 6) | (next & 0x3F);
  }
  constexpr int32_t kMin[] = {0, 0, 0x80, 0x800, 0x10000};
  if (c < kMin[length] || c > 0x10FFFF || (c >= 0xD800 && c <= 0xDFFF)) {
    ++*pos;
    return -1;
  }
  *pos += length;
  return c;
}

// Characters that would let text look other than it is: controls (C0, DEL, C1), bidirectional
// marks, embeddings, overrides and isolates, and invisible format characters.
bool IsDeceptive(int32_t c) {
  return c < 0x20 || (c >= 0x7F && c <= 0x9F) || c == 0x061C || (c >= 0x200B && c <= 0x200F) ||
         (c >= 0x202A && c <= 0x202E) || (c >= 0x2060 && c <= 0x2069) || c == 0xFEFF;
}

// Text an agent chose (a task's purpose), shown to a human who decides on it (DESIGN.md §10):
// in double quotes, with quotes and backslashes escaped, deceptive characters as \uXXXX (\t, \n,
// \r by name) and bytes that are not UTF-8 as \xNN, so the human sees exactly what is there and
// where it ends.
std::string QuotedAgentText(std::string_view s) {
  std::string out = "\"";
  for (size_t pos = 0; pos < s.size();) {
    const size_t start = pos;
    const int32_t c = NextUtf8(s, &pos);
    if (c < 0) {
      out += absl::StrFormat("\\x%02x", static_cast<unsigned char>(s[start]));
    } else if (c == '"' || c == '\\') {
      out += '\\';
      out += static_cast<char>(c);
    } else if (c == '\t') {
      out += "\\t";
    } else if (c == '\n') {
      out += "\\n";
    } else if (c == '\r') {
      out += "\\r";
    } else if (IsDeceptive(c)) {
      out += absl::StrFormat("\\u%04x", c);
    } else {
      out.append(s.substr(start, pos - start));
    }
  }
  out += '"';
  return out;
}

json StringsJson(const google::protobuf::RepeatedPtrField<std::string>& values) {
  json arr = json::array();
  for (const std::string& v : values) {
    arr.push_back(v);
  }
  return arr;
}

std::string JoinPrintable(const google::protobuf::RepeatedPtrField<std::string>& values) {
  std::vector<std::string> parts;
  for (const std::string& v : values) {
    parts.push_back(Printable(v));
  }
  return parts.empty() ? "-" : absl::StrJoin(parts, ",");
}

// A left-aligned text table with a header row.
void PrintTable(std::ostream& out, const std::vector<std::string>& header,
                const std::vector<std::vector<std::string>>& rows) {
  std::vector<size_t> widths(header.size());
  for (size_t i = 0; i < header.size(); ++i) {
    widths[i] = header[i].size();
  }
  for (const auto& row : rows) {
    for (size_t i = 0; i < row.size() && i < widths.size(); ++i) {
      widths[i] = std::max(widths[i], row[i].size());
    }
  }
  auto print_row = [&](const std::vector<std::string>& row) {
    std::string line;
    for (size_t i = 0; i < row.size(); ++i) {
      line += row[i];
      if (i + 1 < row.size()) {
        line += std::string(widths[i] - row[i].size() + 2, ' ');
      }
    }
    out << line << "\n";
  };
  print_row(header);
  for (const auto& row : rows) {
    print_row(row);
  }
}

json EntryJson(const commonpb::Entry& e) {
  return json{{"id", e.id()},
              {"spiffe_id", e.spiffe_id()},
              {"parent_id", e.parent_id()},
              {"selectors", StringsJson(e.selectors())},
              {"scopes", StringsJson(e.scopes())},
              {"x509_ttl_seconds", e.x509_ttl_seconds()},
              {"jwt_ttl_seconds", e.jwt_ttl_seconds()},
              {"token_ttl_seconds", e.token_ttl_seconds()},
              {"created_at", TimeJson(e.created_at())},
              {"revision", e.revision()}};
}

void PrintEntryText(std::ostream& out, const commonpb::Entry& e) {
  auto ttl = [](int64_t s) { return s == 0 ? std::string("default") : absl::StrCat(s, "s"); };
  out << "Entry ID:   " << Printable(e.id()) << "\n"
      << "SPIFFE ID:  " << Printable(e.spiffe_id()) << "\n"
      << "Parent ID:  " << Printable(e.parent_id()) << "\n";
  for (const std::string& s : e.selectors()) {
    out << "Selector:   " << Printable(s) << "\n";
  }
  for (const std::string& s : e.scopes()) {
    out << "Scope:      " << Printable(s) << "\n";
  }
  out << "X509 TTL:   " << ttl(e.x509_ttl_seconds()) << "\n"
      << "JWT TTL:    " << ttl(e.jwt_ttl_seconds()) << "\n"
      << "Token TTL:  " << ttl(e.token_ttl_seconds()) << "\n"
      << "Created at: " << TimeText(e.created_at()) << "\n"
      << "Revision:   " << e.revision() << "\n";
}

json AgentJson(const commonpb::Node& n) {
  return json{{"spiffe_id", n.spiffe_id()},
              {"attestor", n.attestor()},
              {"selectors", StringsJson(n.selectors())},
              {"cert_serial", n.cert_serial()},
              {"cert_expires_at", TimeJson(n.cert_expires_at())},
              {"created_at", TimeJson(n.created_at())},
              {"updated_at", TimeJson(n.updated_at())},
              {"banned", n.banned()}};
}

// ---------------------------------------------------------------------------- admin client

// The broker admin API over its Unix socket (mode 0600, so plain insecure credentials: the
// kernel's file permissions are the authentication).
class AdminClient {
 public:
  static absl::StatusOr<AdminClient> Open(std::string_view socket_flag) {
    std::string path(socket_flag);
    if (absl::StartsWith(path, "unix://")) {
      path = path.substr(7);
    } else if (absl::StartsWith(path, "unix:")) {
      path = path.substr(5);
    }
    if (path.empty()) {
      return absl::InvalidArgumentError(
          absl::StrCat("the broker admin socket path is empty ", kAdminSocketHint));
    }
    struct stat st;
    if (::stat(path.c_str(), &st) != 0) {
      int e = errno;
      if (e == ENOENT) {
        return absl::UnavailableError(
            absl::StrCat("cannot reach the broker admin socket ", path,
                         ": it does not exist; is mandate-broker running? ", kAdminSocketHint));
      }
      if (e == EACCES) {
        return absl::PermissionDeniedError(absl::StrCat(
            "cannot reach the broker admin socket ", path,
            ": permission denied on a parent directory; run mandate as the broker's user"));
      }
      return absl::UnavailableError(absl::StrCat("cannot reach the broker admin socket ", path,
                                                 ": ", std::strerror(e), " ", kAdminSocketHint));
    }
    if (!S_ISSOCK(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat(path, " is not a socket; point ",
                                                     "--admin-socket at the broker's admin.sock"));
    }
    if (::access(path.c_str(), R_OK | W_OK) != 0) {
      return absl::PermissionDeniedError(absl::StrCat(
          "cannot reach the broker admin socket ", path,
          ": permission denied (the socket is mode 0600); run mandate as the broker's user"));
    }
    auto channel = grpc::CreateChannel("unix:" + path, grpc::InsecureChannelCredentials());
    return AdminClient(path, adminpb::Admin::NewStub(channel));
  }

  adminpb::Admin::Stub& stub() { return *stub_; }

  // Runs one unary call with a deadline and turns a gRPC failure into a status saying what to
  // fix; the broker's own message is kept.
  absl::Status Call(absl::string_view what,
                    const std::function<grpc::Status(grpc::ClientContext*)>& call) {
    grpc::ClientContext ctx;
    ctx.set_deadline(std::chrono::system_clock::now() + kAdminCallTimeout);
    grpc::Status status = call(&ctx);
    if (status.ok()) {
      return absl::OkStatus();
    }
    switch (status.error_code()) {
      case grpc::StatusCode::UNAVAILABLE:
        return absl::UnavailableError(absl::StrCat(
            "cannot reach the broker admin socket ", path_, ": is mandate-broker running? ",
            kAdminSocketHint, " (", status.error_message(), ")"));
      case grpc::StatusCode::DEADLINE_EXCEEDED:
        return absl::DeadlineExceededError(
            absl::StrCat(what, ": the broker did not answer within 10 s on ", path_));
      default:
        return absl::Status(static_cast<absl::StatusCode>(status.error_code()),
                            absl::StrCat(what, ": ", status.error_message()));
    }
  }

 private:
  AdminClient(std::string path, std::unique_ptr<adminpb::Admin::Stub> stub)
      : path_(std::move(path)), stub_(std::move(stub)) {}
  std::string path_;
  std::unique_ptr<adminpb::Admin::Stub> stub_;
};

// ---------------------------------------------------------------------------- admin commands

absl::Status TokenGenerate(const Io& io, const std::string& spiffe_id, int64_t ttl) {
  // Client-side check for a clearer message; the broker is the authority.
  auto id = spiffe::SpiffeId::Parse(spiffe_id);
  if (!id.ok()) {
    return absl::InvalidArgumentError(absl::StrCat("--spiffe-id: ", id.status().message()));
  }
  if (!id->path().starts_with("/node/join/")) {
    return absl::InvalidArgumentError(absl::StrCat(
        "--spiffe-id must have the form spiffe://<trust domain>/node/join/<name>, got ",
        spiffe_id));
  }
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::CreateJoinTokenRequest req;
  req.set_spiffe_id(spiffe_id);
  req.set_ttl_seconds(ttl);
  adminpb::CreateJoinTokenResponse resp;
  RETURN_IF_ERROR(admin.Call("creating a join token", [&](grpc::ClientContext* ctx) {
    return admin.stub().CreateJoinToken(ctx, req, &resp);
  }));
  if (io.json()) {
    PrintJson(io.out, json{{"token", resp.token()},
                           {"spiffe_id", resp.spiffe_id()},
                           {"expires_at", TimeJson(resp.expires_at())}});
  } else {
    io.out << Printable(resp.token()) << "\n";
  }
  return absl::OkStatus();
}

struct EntryCreateArgs {
  std::string parent_id;
  std::string spiffe_id;
  std::vector<std::string> selectors;
  std::vector<std::string> scopes;
  int64_t x509_ttl = 0;
  int64_t jwt_ttl = 0;
  int64_t token_ttl = 0;
};

absl::Status EntryCreate(const Io& io, const EntryCreateArgs& a) {
  adminpb::CreateEntryRequest req;
  commonpb::Entry* e = req.mutable_entry();
  e->set_parent_id(a.parent_id);
  e->set_spiffe_id(a.spiffe_id);
  for (const std::string& s : a.selectors) {
    e->add_selectors(s);
  }
  for (const std::string& s : a.scopes) {
    e->add_scopes(s);
  }
  e->set_x509_ttl_seconds(a.x509_ttl);
  e->set_jwt_ttl_seconds(a.jwt_ttl);
  e->set_token_ttl_seconds(a.token_ttl);
  // The broker's own rules (it knows its trust domain and TTL limit and checks those too).
  RETURN_IF_ERROR(registration::ValidateEntry(*e, nullptr, 0));
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  commonpb::Entry created;
  RETURN_IF_ERROR(admin.Call("creating the entry", [&](grpc::ClientContext* ctx) {
    return admin.stub().CreateEntry(ctx, req, &created);
  }));
  if (io.json()) {
    PrintJson(io.out, EntryJson(created));
  } else {
    PrintEntryText(io.out, created);
  }
  return absl::OkStatus();
}

absl::Status EntryList(const Io& io, int64_t limit) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::ListEntriesResponse resp;
  RETURN_IF_ERROR(admin.Call("listing entries", [&](grpc::ClientContext* ctx) {
    return admin.stub().ListEntries(ctx, adminpb::ListEntriesRequest(), &resp);
  }));
  size_t n = resp.entries_size();
  if (limit > 0 && static_cast<size_t>(limit) < n) {
    n = static_cast<size_t>(limit);
  }
  if (io.json()) {
    json arr = json::array();
    for (size_t i = 0; i < n; ++i) {
      arr.push_back(EntryJson(resp.entries(i)));
    }
    PrintJson(io.out, json{{"entries", arr}});
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows;
  for (size_t i = 0; i < n; ++i) {
    const commonpb::Entry& e = resp.entries(i);
    rows.push_back({Printable(e.id()), Printable(e.spiffe_id()), Printable(e.parent_id()),
                    JoinPrintable(e.selectors()), JoinPrintable(e.scopes())});
  }
  PrintTable(io.out, {"ID", "SPIFFE ID", "PARENT ID", "SELECTORS", "SCOPES"}, rows);
  return absl::OkStatus();
}

absl::Status EntryShow(const Io& io, const std::string& id) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::GetEntryRequest req;
  req.set_id(id);
  commonpb::Entry entry;
  RETURN_IF_ERROR(admin.Call(
      absl::StrCat("showing entry ", Printable(id)),
      [&](grpc::ClientContext* ctx) { return admin.stub().GetEntry(ctx, req, &entry); }));
  if (io.json()) {
    PrintJson(io.out, EntryJson(entry));
  } else {
    PrintEntryText(io.out, entry);
  }
  return absl::OkStatus();
}

absl::Status EntryDelete(const Io& io, const std::string& id) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::DeleteEntryRequest req;
  req.set_id(id);
  adminpb::DeleteEntryResponse resp;
  RETURN_IF_ERROR(admin.Call(
      absl::StrCat("deleting entry ", Printable(id)),
      [&](grpc::ClientContext* ctx) { return admin.stub().DeleteEntry(ctx, req, &resp); }));
  if (io.json()) {
    PrintJson(io.out, json{{"deleted", id}});
  } else {
    io.out << "Deleted entry " << Printable(id) << "\n";
  }
  return absl::OkStatus();
}

absl::Status AgentList(const Io& io, int64_t limit) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::ListAgentsResponse resp;
  RETURN_IF_ERROR(admin.Call("listing agents", [&](grpc::ClientContext* ctx) {
    return admin.stub().ListAgents(ctx, adminpb::ListAgentsRequest(), &resp);
  }));
  size_t n = resp.agents_size();
  if (limit > 0 && static_cast<size_t>(limit) < n) {
    n = static_cast<size_t>(limit);
  }
  if (io.json()) {
    json arr = json::array();
    for (size_t i = 0; i < n; ++i) {
      arr.push_back(AgentJson(resp.agents(i)));
    }
    PrintJson(io.out, json{{"agents", arr}});
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows;
  for (size_t i = 0; i < n; ++i) {
    const commonpb::Node& a = resp.agents(i);
    rows.push_back({Printable(a.spiffe_id()), Printable(a.attestor()),
                    TimeText(a.cert_expires_at()), a.banned() ? "yes" : "no",
                    JoinPrintable(a.selectors())});
  }
  PrintTable(io.out, {"SPIFFE ID", "ATTESTOR", "CERT EXPIRES", "BANNED", "SELECTORS"}, rows);
  return absl::OkStatus();
}

absl::Status AgentAction(const Io& io, const std::string& id, bool ban) {
  auto parsed = spiffe::SpiffeId::Parse(id);
  if (!parsed.ok()) {
    return absl::InvalidArgumentError(
        absl::StrCat("agent ID '", Printable(id), "': ", parsed.status().message()));
  }
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::AgentRequest req;
  req.set_spiffe_id(id);
  adminpb::AgentResponse resp;
  RETURN_IF_ERROR(admin.Call(absl::StrCat(ban ? "banning agent " : "evicting agent ", id),
                             [&](grpc::ClientContext* ctx) {
                               return ban ? admin.stub().BanAgent(ctx, req, &resp)
                                          : admin.stub().EvictAgent(ctx, req, &resp);
                             }));
  if (io.json()) {
    PrintJson(io.out, json{{ban ? "banned" : "evicted", id}});
  } else {
    io.out << (ban ? "Banned agent " : "Evicted agent ") << id << "\n";
  }
  return absl::OkStatus();
}

struct AuditFilter {
  std::string since;  // Unix seconds or RFC 3339
  std::string spiffe_id;
  std::string task_id;
  std::string jti;
  int64_t limit = 1000;
};

absl::StatusOr<int64_t> ParseSince(const std::string& since) {
  if (since.empty()) return 0;
  int64_t seconds = 0;
  if (absl::SimpleAtoi(since, &seconds) && seconds >= 0) return seconds;
  absl::Time time;
  std::string error;
  if (absl::ParseTime(absl::RFC3339_full, since, &time, &error)) return absl::ToUnixSeconds(time);
  return absl::InvalidArgumentError(
      absl::StrCat("--since '", Printable(since),
                   "' is neither Unix seconds nor an RFC 3339 time (e.g. 2026-11-22T05:00:00Z)"));
}

absl::Status AuditList(const Io& io, const AuditFilter& filter) {
  ASSIGN_OR_RETURN(int64_t since, ParseSince(filter.since));
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::ListAuditRequest req;
  req.set_since(since);
  req.set_spiffe_id(filter.spiffe_id);
  req.set_task_id(filter.task_id);
  req.set_credential_id(filter.jti);
  req.set_limit(filter.limit);
  adminpb::ListAuditResponse resp;
  RETURN_IF_ERROR(admin.Call("listing the audit log", [&](grpc::ClientContext* ctx) {
    return admin.stub().ListAudit(ctx, req, &resp);
  }));
  if (io.json()) {
    json records = json::array();
    for (const adminpb::AuditRecord& r : resp.records()) {
      json detail = json::parse(r.detail(), nullptr, /*allow_exceptions=*/false);
      if (detail.is_discarded()) detail = r.detail();  // shown as stored rather than hidden
      records.push_back({{"chain_id", r.chain_id()},
                         {"seq", r.seq()},
                         {"time", Rfc3339(r.time())},
                         {"event", r.event()},
                         {"outcome", r.outcome()},
                         {"spiffe_id", r.spiffe_id()},
                         {"node_id", r.node_id()},
                         {"task_id", r.task_id()},
                         {"credential_id", r.credential_id()},
                         {"detail", detail},
                         {"prev_hash", r.prev_hash()},
                         {"hash", r.hash()}});
    }
    PrintJson(io.out, json{{"records", records}});
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows;
  for (const adminpb::AuditRecord& r : resp.records()) {
    rows.push_back({TimeText(r.time()), absl::StrCat(Printable(r.chain_id()), "/", r.seq()),
                    Printable(r.event()), Printable(r.outcome()), Printable(r.spiffe_id()),
                    Printable(r.task_id()), Printable(r.credential_id()), Printable(r.detail())});
  }
  PrintTable(io.out,
             {"TIME", "CHAIN/SEQ", "EVENT", "OUTCOME", "SPIFFE ID", "TASK", "CREDENTIAL", "DETAIL"},
             rows);
  return absl::OkStatus();
}

// "3-7, 12-12" for the ranges of `c` nothing vouches for.
std::string NotVouchedRanges(const adminpb::AuditChainStatus& c) {
  return absl::StrJoin(c.not_vouched(), ", ",
                       [](std::string* out, const adminpb::AuditSeqRange& r) {
                         absl::StrAppend(out, r.first(), "-", r.last());
                       });
}

// `strict`: records nothing vouches for fail the command too (by default they are a warning:
// after a kill -9, the honest records since the last checkpoint fall there).
absl::Status AuditVerify(const Io& io, bool strict) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::VerifyAuditResponse resp;
  RETURN_IF_ERROR(admin.Call("verifying the audit log", [&](grpc::ClientContext* ctx) {
    return admin.stub().VerifyAudit(ctx, adminpb::VerifyAuditRequest(), &resp);
  }));
  bool intact = true;
  std::vector<std::string> failed;
  std::vector<std::string> not_vouched;  // chains with records nothing vouches for
  json chains = json::array();
  for (const adminpb::AuditChainStatus& c : resp.chains()) {
    intact = intact && c.intact();
    if (!c.intact()) failed.push_back(Printable(c.chain_id()));
    if (c.intact() && !c.not_vouched().empty()) not_vouched.push_back(Printable(c.chain_id()));
    const std::string whose = c.this_broker() ? " (this broker)" : "";
    if (io.json()) {
      json ranges = json::array();
      for (const adminpb::AuditSeqRange& r : c.not_vouched())
        ranges.push_back({r.first(), r.last()});
      chains.push_back({{"chain_id", c.chain_id()},
                        {"this_broker", c.this_broker()},
                        {"records", c.records()},
                        {"head_hash", c.head_hash()},
                        {"intact", c.intact()},
                        {"unverified", c.unverified()},
                        {"problem", c.problem()},
                        {"checkpoints", c.checkpoints()},
                        {"checkpointed_seq", c.checkpointed_seq()},
                        {"covered_seq", c.covered_seq()},
                        {"not_vouched", ranges}});
    } else if (c.intact()) {
      io.out << "chain " << Printable(c.chain_id()) << whose << ": " << c.records()
             << " records, intact, head " << Printable(c.head_hash()) << "; " << c.checkpoints()
             << " signed checkpoint(s) hold, newest at record " << c.checkpointed_seq();
      if (c.covered_seq() > 0) {
        io.out << "; records 1-" << c.covered_seq() << " vouched for";
        if (!c.not_vouched().empty()) io.out << " except " << NotVouchedRanges(c);
      }
      io.out << "\n";
      if (!c.not_vouched().empty()) {
        io.out << "WARNING: chain " << Printable(c.chain_id()) << ": records "
               << NotVouchedRanges(c)
               << " are NOT VOUCHED FOR: they were in the store past the last signed checkpoint "
                  "when the broker started (written by a broker run that ended without its "
                  "final checkpoint, e.g. kill -9, or added to the store by someone else)\n";
      }
    } else if (c.unverified()) {
      io.out << "chain " << Printable(c.chain_id()) << whose << ": UNVERIFIED, " << c.records()
             << " records link up but nothing vouches for them: " << Printable(c.problem()) << "\n";
    } else {
      io.out << "chain " << Printable(c.chain_id()) << whose << ": BROKEN after " << c.records()
             << " good records: " << Printable(c.problem()) << "\n";
    }
  }
  if (io.json()) {
    PrintJson(io.out,
              json{{"chains", chains}, {"intact", intact}, {"vouched", not_vouched.empty()}});
  }
  if (resp.chains().empty() && !io.json()) io.out << "the audit log is empty\n";
  if (!intact) {
    return absl::DataLossError(absl::StrCat("the audit log does not verify: chain(s) ",
                                            absl::StrJoin(failed, ", "), " (see above)"));
  }
  if (strict && !not_vouched.empty()) {
    return absl::DataLossError(absl::StrCat("--strict: chain(s) ", absl::StrJoin(not_vouched, ", "),
                                            " hold records nothing vouches for (see above)"));
  }
  return absl::OkStatus();
}

absl::Status BundleShow(const Io& io, const std::string& format) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::GetBundleResponse resp;
  RETURN_IF_ERROR(admin.Call("fetching the bundle", [&](grpc::ClientContext* ctx) {
    return admin.stub().GetBundle(ctx, adminpb::GetBundleRequest(), &resp);
  }));
  if (io.json()) {
    json jwks = json::parse(resp.jwks(), nullptr, /*allow_exceptions=*/false);
    if (jwks.is_discarded()) {
      jwks = resp.jwks();  // shown as received rather than hidden
    }
    PrintJson(
        io.out,
        json{{"trust_domain", resp.trust_domain()}, {"x509_pem", resp.x509_pem()}, {"jwks", jwks}});
    return absl::OkStatus();
  }
  if (format == "jwks") {
    io.out << resp.jwks();
    if (!absl::EndsWith(resp.jwks(), "\n")) {
      io.out << "\n";
    }
  } else {
    io.out << resp.x509_pem();
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------- approvals

json ApprovalJson(const adminpb::Approval& a) {
  json input = json::parse(a.input_document(), nullptr, /*allow_exceptions=*/false);
  if (input.is_discarded()) input = a.input_document();  // shown as stored rather than hidden
  return json{{"id", a.id()},
              {"status", a.status()},
              {"task_id", a.task_id()},
              {"spiffe_id", a.spiffe_id()},
              {"purpose", a.purpose()},
              {"scopes", StringsJson(a.scopes())},
              {"audiences", StringsJson(a.audiences())},
              {"task_ttl_seconds", a.task_ttl_seconds()},
              {"task_status", a.task_status()},
              {"task_expires_at", TimeJson(a.task_expires_at())},
              {"created_at", TimeJson(a.created_at())},
              {"expires_at", TimeJson(a.expires_at())},
              {"decided_at", TimeJson(a.decided_at())},
              {"decided_by", a.decided_by()},
              {"reason", a.reason()},
              {"input", input}};
}

// Approval ids are "appr_" + 22 base64url characters; checked here for a clearer message (the
// broker is the authority).
absl::Status CheckApprovalIdArg(const std::string& id) {
  const bool ok = absl::StartsWith(id, "appr_") && id.size() == 27 &&
                  std::all_of(id.begin() + 5, id.end(), [](unsigned char c) {
                    return absl::ascii_isalnum(c) || c == '-' || c == '_';
                  });
  if (!ok) {
    return absl::InvalidArgumentError(
        absl::StrCat("'", Printable(id),
                     "' is not an approval ID (appr_ followed by 22 characters; see mandate "
                     "approval list)"));
  }
  return absl::OkStatus();
}

absl::Status ApprovalList(const Io& io, const std::string& status, int64_t limit) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::ListApprovalsRequest req;
  req.set_status(status);
  adminpb::ListApprovalsResponse resp;
  RETURN_IF_ERROR(admin.Call("listing approvals", [&](grpc::ClientContext* ctx) {
    return admin.stub().ListApprovals(ctx, req, &resp);
  }));
  size_t n = resp.approvals_size();
  if (limit > 0 && static_cast<size_t>(limit) < n) n = static_cast<size_t>(limit);
  if (io.json()) {
    json arr = json::array();
    for (size_t i = 0; i < n; ++i) arr.push_back(ApprovalJson(resp.approvals(i)));
    PrintJsonAscii(io.out, json{{"approvals", arr}});
    return absl::OkStatus();
  }
  std::vector<std::vector<std::string>> rows;
  for (size_t i = 0; i < n; ++i) {
    const adminpb::Approval& a = resp.approvals(i);
    rows.push_back({Printable(a.id()), Printable(a.status()), TimeText(a.expires_at()),
                    Printable(a.spiffe_id()), JoinPrintable(a.scopes()),
                    QuotedAgentText(a.purpose())});
  }
  PrintTable(io.out, {"ID", "STATUS", "EXPIRES", "SPIFFE ID", "SCOPES", "PURPOSE"}, rows);
  return absl::OkStatus();
}

void PrintApprovalText(std::ostream& out, const adminpb::Approval& a) {
  out << "Approval:   " << Printable(a.id()) << "\n"
      << "Status:     " << Printable(a.status()) << "\n"
      << "Expires:    " << TimeText(a.expires_at()) << "\n"
      << "Task:       " << Printable(a.task_id()) << " (" << Printable(a.task_status()) << ")\n"
      << "SPIFFE ID:  " << Printable(a.spiffe_id()) << "\n"
      << "Purpose:    " << QuotedAgentText(a.purpose()) << "  (agent-supplied text)\n"
      << "Scopes:     " << JoinPrintable(a.scopes()) << "\n"
      << "Audiences:  " << JoinPrintable(a.audiences()) << "\n"
      << "Lifetime:   " << a.task_ttl_seconds() << "s from approval\n"
      << "Created:    " << TimeText(a.created_at()) << "\n";
  if (a.decided_at() != 0) {
    out << "Decided:    " << TimeText(a.decided_at());
    if (!a.decided_by().empty()) out << " by " << Printable(a.decided_by());
    out << "\n";
  }
  if (!a.reason().empty()) out << "Reason:     " << QuotedAgentText(a.reason()) << "\n";
  if (a.task_status() == "active") out << "Task until: " << TimeText(a.task_expires_at()) << "\n";
}

absl::Status ApprovalShow(const Io& io, const std::string& id) {
  RETURN_IF_ERROR(CheckApprovalIdArg(id));
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::GetApprovalRequest req;
  req.set_id(id);
  adminpb::Approval approval;
  RETURN_IF_ERROR(admin.Call(absl::StrCat("showing approval ", id), [&](grpc::ClientContext* ctx) {
    return admin.stub().GetApproval(ctx, req, &approval);
  }));
  if (io.json()) {
    PrintJsonAscii(io.out, ApprovalJson(approval));
    return absl::OkStatus();
  }
  PrintApprovalText(io.out, approval);
  // The whole document the policy hook was asked about. Every non-ASCII character is written as
  // \uXXXX and every control character escaped, so strings the agent chose are shown as data.
  io.out << "Input document (the policy input; non-ASCII and control characters escaped):\n";
  json input = json::parse(approval.input_document(), nullptr, /*allow_exceptions=*/false);
  if (input.is_discarded()) {
    io.out << QuotedAgentText(approval.input_document()) << "\n";
  } else {
    PrintJsonAscii(io.out, input);
  }
  return absl::OkStatus();
}

absl::Status ApprovalDecide(const Io& io, const std::string& id, bool approve,
                            const std::string& reason) {
  RETURN_IF_ERROR(CheckApprovalIdArg(id));
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::DecideApprovalRequest req;
  req.set_id(id);
  req.set_approve(approve);
  req.set_reason(reason);
  adminpb::Approval approval;
  RETURN_IF_ERROR(admin.Call(
      absl::StrCat(approve ? "approving " : "denying ", id),
      [&](grpc::ClientContext* ctx) { return admin.stub().DecideApproval(ctx, req, &approval); }));
  if (io.json()) {
    PrintJsonAscii(io.out, ApprovalJson(approval));
  } else if (approve) {
    io.out << "Approved " << Printable(approval.id()) << ": task " << Printable(approval.task_id())
           << " is active until " << TimeText(approval.task_expires_at()) << "\n";
  } else {
    io.out << "Denied " << Printable(approval.id()) << ": task " << Printable(approval.task_id())
           << " is refused\n";
  }
  return absl::OkStatus();
}

absl::Status PolicyReload(const Io& io) {
  ASSIGN_OR_RETURN(AdminClient admin, AdminClient::Open(io.global.admin_socket));
  adminpb::ReloadPolicyResponse resp;
  RETURN_IF_ERROR(admin.Call("reloading the policy", [&](grpc::ClientContext* ctx) {
    return admin.stub().ReloadPolicy(ctx, adminpb::ReloadPolicyRequest(), &resp);
  }));
  if (io.json()) {
    PrintJson(io.out, json{{"reloaded", true}});
  } else {
    io.out << "Policy reloaded\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------- workload commands

absl::StatusOr<std::unique_ptr<WorkloadClient>> ConnectWorkload(const Io& io) {
  auto client = WorkloadClient::Connect(io.global.socket);
  if (!client.ok() && io.global.socket.empty() &&
      client.status().code() == absl::StatusCode::kInvalidArgument) {
    return absl::InvalidArgumentError(
        absl::StrCat(client.status().message(), ", or pass --socket"));
  }
  return client;
}

absl::Status MakeDirectory(const std::string& dir) {
  struct stat st;
  if (::stat(dir.c_str(), &st) == 0) {
    if (!S_ISDIR(st.st_mode)) {
      return absl::InvalidArgumentError(absl::StrCat("--write ", dir, " is not a directory"));
    }
    return absl::OkStatus();
  }
  if (::mkdir(dir.c_str(), 0700) != 0) {
    return absl::InvalidArgumentError(
        absl::StrCat("--write: cannot create directory ", dir, ": ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

absl::Status FetchX509(const Io& io, const std::string& write_dir) {
  ASSIGN_OR_RETURN(auto client, ConnectWorkload(io));
  ASSIGN_OR_RETURN(X509Context context, client->FetchX509Context());
  if (context.svids.empty()) {
    return absl::NotFoundError("the Workload API returned no X509-SVID for this process");
  }
  const X509Svid& svid = context.svids.front();
  std::string bundle_pem;
  if (auto id = spiffe::SpiffeId::Parse(svid.spiffe_id); id.ok()) {
    if (auto it = context.bundles.find(id->trust_domain().name()); it != context.bundles.end()) {
      bundle_pem = it->second.Pem();
    }
  }
  if (!write_dir.empty()) {
    if (bundle_pem.empty()) {
      return absl::UnavailableError(
          absl::StrCat("the Workload API sent no X.509 bundle for the trust domain of ",
                       svid.spiffe_id, "; nothing written"));
    }
    RETURN_IF_ERROR(MakeDirectory(write_dir));
    const std::string cert_path = write_dir + "/svid.pem";
    const std::string key_path = write_dir + "/svid.key";
    const std::string bundle_path = write_dir + "/bundle.pem";
    RETURN_IF_ERROR(crypto::WriteFileAtomic(cert_path, svid.ChainPem(), 0644));
    RETURN_IF_ERROR(crypto::WriteFileAtomic(key_path, svid.KeyPem(), 0600));
    RETURN_IF_ERROR(crypto::WriteFileAtomic(bundle_path, bundle_pem, 0644));
    if (io.json()) {
      PrintJson(io.out,
                json{{"spiffe_id", svid.spiffe_id},
                     {"expires_at", TimeJson(svid.expires_at)},
                     {"files", {{"svid", cert_path}, {"key", key_path}, {"bundle", bundle_path}}}});
    } else {
      io.out << "SPIFFE ID: " << svid.spiffe_id << "\n"
             << "Wrote " << cert_path << ", " << key_path << " (mode 0600) and " << bundle_path
             << "\n";
    }
    return absl::OkStatus();
  }
  if (io.json()) {
    PrintJson(io.out, json{{"spiffe_id", svid.spiffe_id},
                           {"hint", svid.hint},
                           {"expires_at", TimeJson(svid.expires_at)},
                           {"chain_pem", svid.ChainPem()},
                           {"bundle_pem", bundle_pem}});
  } else {
    io.out << "SPIFFE ID: " << svid.spiffe_id << "\n" << svid.ChainPem();
  }
  return absl::OkStatus();
}

absl::Status FetchJwt(const Io& io, const std::vector<std::string>& audiences,
                      const std::string& spiffe_id) {
  ASSIGN_OR_RETURN(auto client, ConnectWorkload(io));
  ASSIGN_OR_RETURN(JwtSvid svid, client->FetchJwtSvid(audiences, spiffe_id));
  if (io.json()) {
    PrintJson(io.out, json{{"spiffe_id", svid.spiffe_id},
                           {"token", svid.token},
                           {"hint", svid.hint},
                           {"expires_at", TimeJson(svid.expiry)}});
  } else {
    io.out << svid.token << "\n";
  }
  return absl::OkStatus();
}

absl::Status ValidateJwt(const Io& io, const std::string& audience, std::string token) {
  if (token == "-") {
    // Keeps the token out of the process list.
    if (!std::getline(std::cin, token)) {
      return absl::InvalidArgumentError("--token -: could not read a token from standard input");
    }
  }
  ASSIGN_OR_RETURN(auto client, ConnectWorkload(io));
  ASSIGN_OR_RETURN(ValidatedJwtSvidResponse resp, client->ValidateJwtSvid(token, audience));
  json claims = json::parse(resp.claims_json, nullptr, /*allow_exceptions=*/false);
  if (io.json()) {
    PrintJson(io.out, json{{"spiffe_id", resp.spiffe_id},
                           {"claims", claims.is_discarded() ? json(resp.claims_json) : claims}});
  } else {
    io.out << "Valid JWT-SVID for " << Printable(resp.spiffe_id) << "\n"
           << "Claims: "
           << (claims.is_discarded()
                   ? Printable(resp.claims_json)
                   : claims.dump(2, ' ', /*ensure_ascii=*/true, json::error_handler_t::replace))
           << "\n";
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------- task commands

json VectorJson(const std::vector<std::string>& values) {
  json arr = json::array();
  for (const std::string& v : values) arr.push_back(v);
  return arr;
}

std::string JoinPrintable(const std::vector<std::string>& values) {
  std::vector<std::string> parts;
  for (const std::string& v : values) parts.push_back(Printable(v));
  return parts.empty() ? "-" : absl::StrJoin(parts, ",");
}

void PrintTask(const Io& io, const TaskInfo& task) {
  if (io.json()) {
    json doc{{"id", task.id},
             {"spiffe_id", task.spiffe_id},
             {"purpose", task.purpose},
             {"status", task.status},
             {"scopes", VectorJson(task.scopes)},
             {"audiences", VectorJson(task.audiences)},
             {"created_at", TimeJson(task.created_at)},
             {"expires_at", TimeJson(task.expires_at)}};
    if (!task.approval_id.empty()) doc["approval_id"] = task.approval_id;
    PrintJson(io.out, doc);
    return;
  }
  io.out << "Task:      " << Printable(task.id) << "\n"
         << "SPIFFE ID: " << Printable(task.spiffe_id) << "\n"
         << "Purpose:   " << Printable(task.purpose) << "\n"
         << "Status:    " << Printable(task.status) << "\n";
  if (!task.approval_id.empty()) io.out << "Approval:  " << Printable(task.approval_id) << "\n";
  io.out << "Scopes:    " << JoinPrintable(task.scopes) << "\n"
         << "Audiences: " << JoinPrintable(task.audiences) << "\n"
         << "Expires:   " << TimeText(task.expires_at) << "\n";
}

struct TaskStartArgs {
  std::string purpose;
  std::vector<std::string> scopes;
  std::vector<std::string> audiences;
  int64_t ttl = 0;
  std::string spiffe_id;
  bool wait = false;
  int64_t wait_timeout = 0;  // seconds; 0: until the approval is decided or expires
  // Polling interval: the first, doubled after each poll up to the last.
  std::chrono::milliseconds first_poll{250};
  std::chrono::milliseconds max_poll{5000};
};

// The broker's answer for a task still awaiting approval (TaskRegistry::GetUsable), as the SDK
// passes it on: FailedPrecondition whose message starts with "authorization_pending" after the
// SDK's own prefix.
bool IsAuthorizationPending(const absl::Status& status) {
  return absl::IsFailedPrecondition(status) &&
         (absl::StartsWith(status.message(), "authorization_pending") ||
          absl::StrContains(status.message(), ": authorization_pending"));
}

// Polls GetTask with backoff until the task is no longer awaiting approval; returns it once
// usable, or why it is not (denied, expired, gone) or that the wait timed out. A Workload API
// that is briefly unreachable (agent restart) is waited for like a pending answer.
absl::StatusOr<TaskInfo> WaitForApproval(const Io& io, WorkloadClient& client,
                                         const TaskInfo& pending, const TaskStartArgs& a) {
  const auto started = std::chrono::steady_clock::now();
  const auto deadline = started + std::chrono::seconds(a.wait_timeout);
  if (!io.json()) {
    io.err << "task " << Printable(pending.id) << " awaits approval "
           << Printable(pending.approval_id) << "; waiting (an operator runs: mandate approval "
           << "show " << Printable(pending.approval_id) << ")\n";
  }
  std::chrono::milliseconds interval = a.first_poll;
  absl::Status last = absl::OkStatus();
  while (true) {
    auto now = std::chrono::steady_clock::now();
    if (a.wait_timeout > 0 && now + interval > deadline) {
      return absl::DeadlineExceededError(
          absl::StrCat("task ", pending.id, " still awaits approval ", pending.approval_id,
                       " after --wait-timeout ", a.wait_timeout, "s",
                       last.ok() ? "" : absl::StrCat(" (last answer: ", last.message(), ")")));
    }
    std::this_thread::sleep_for(interval);
    interval = std::min(interval * 2, a.max_poll);
    absl::StatusOr<TaskInfo> task = client.GetTask(pending.id, a.spiffe_id);
    if (task.ok() && task->status != "pending_approval") return task;
    if (task.ok() || IsAuthorizationPending(task.status()) || absl::IsUnavailable(task.status()) ||
        absl::IsDeadlineExceeded(task.status())) {
      last = task.status();
      continue;
    }
    return absl::Status(
        task.status().code(),
        absl::StrCat("task ", pending.id, " was not approved: ", task.status().message()));
  }
}

absl::Status TaskStart(const Io& io, const TaskStartArgs& a) {
  ASSIGN_OR_RETURN(auto client, ConnectWorkload(io));
  ASSIGN_OR_RETURN(TaskInfo task, client->DeclareTask(a.purpose, a.scopes, a.audiences,
                                                      std::chrono::seconds(a.ttl), a.spiffe_id));
  if (a.wait && task.status == "pending_approval") {
    ASSIGN_OR_RETURN(task, WaitForApproval(io, *client, task, a));
  }
  PrintTask(io, task);
  return absl::OkStatus();
}

absl::Status TaskEnd(const Io& io, const std::string& id, const std::string& spiffe_id) {
  ASSIGN_OR_RETURN(auto client, ConnectWorkload(io));
  ASSIGN_OR_RETURN(TaskInfo task, client->EndTask(id, spiffe_id));
  PrintTask(io, task);
  return absl::OkStatus();
}

// One upstream request to sign a DPoP proof for (`task token --dpop-request "METHOD URL"`).
struct DpopRequest {
  std::string method;
  std::string url;
};

// RFC 9110 §5.6.2 tchar.
bool IsTokenChar(unsigned char c) {
  return absl::ascii_isalnum(c) ||
         std::string_view("!#$%&'*+-.^_`|~").find(c) != std::string_view::npos;
}

// Parses "METHOD URL": an RFC 9110 method token in upper case, exactly one space and an absolute
// http(s) URL without spaces. The URL's finer rules (host, port, path) are the SDK's, checked when
// a proof is made.
absl::StatusOr<DpopRequest> ParseDpopRequest(std::string_view arg) {
  auto refuse = [arg](const std::string& why) {
    return absl::InvalidArgumentError(
        absl::StrCat("--dpop-request '", Printable(arg), "': ", why,
                     "; expected \"METHOD URL\", e.g. \"GET https://api.example.org/v1/items\""));
  };
  size_t space = arg.find(' ');
  if (space == std::string_view::npos) {
    return refuse("no space between the method and the URL");
  }
  std::string method(arg.substr(0, space));
  std::string url(arg.substr(space + 1));
  if (method.empty()) {
    return refuse("the method is empty");
  }
  for (unsigned char c : method) {
    if (!IsTokenChar(c)) {
      return refuse("the method is not an HTTP method token");
    }
  }
  if (std::any_of(method.begin(), method.end(),
                  [](unsigned char c) { return absl::ascii_islower(c); })) {
    return refuse(
        absl::StrCat("HTTP methods are case-sensitive; write ", absl::AsciiStrToUpper(method)));
  }
  if (url.empty()) {
    return refuse("the URL is empty");
  }
  for (unsigned char c : url) {
    if (c <= 0x20 || c >= 0x7f) {
      return refuse(
          "the URL contains a space, a control or a non-ASCII character (exactly one space "
          "separates the method from the URL)");
    }
  }
  if (!absl::StartsWithIgnoreCase(url, "https://") && !absl::StartsWithIgnoreCase(url, "http://")) {
    return refuse("the URL is not an absolute http:// or https:// URL");
  }
  return DpopRequest{std::move(method), std::move(url)};
}

absl::Status TaskTokenCommand(const Io& io, const std::string& id, const std::string& audience,
                              const std::vector<std::string>& scopes,
                              const std::vector<std::string>& dpop_request_args,
                              const std::string& spiffe_id) {
  std::vector<DpopRequest> requests;
  for (const std::string& arg : dpop_request_args) {
    ASSIGN_OR_RETURN(DpopRequest request, ParseDpopRequest(arg));
    requests.push_back(std::move(request));
  }
  ASSIGN_OR_RETURN(auto client, ConnectWorkload(io));
  // Connecting is lazy and proofs are made locally: a throwaway proof per request checks every
  // URL with the SDK's own rules before anything is asked of the agent, so a typo cannot cost a
  // minted token.
  for (const DpopRequest& r : requests) {
    if (absl::StatusOr<std::string> probe = client->CreateProof(r.method, r.url); !probe.ok()) {
      return absl::Status(probe.status().code(),
                          absl::StrCat("--dpop-request '", Printable(r.method), " ",
                                       Printable(r.url), "': ", probe.status().message()));
    }
  }
  // This process is the workload: it learns the token endpoint from the task, signs the proof
  // with a key that lives only as long as it does, and prints the token and its key thumbprint.
  // The key dies with the process, so the proofs for upstream requests (bound to the token by
  // ath) are made now, with the same key.
  ASSIGN_OR_RETURN(TaskInfo task, client->GetTask(id, spiffe_id));
  ASSIGN_OR_RETURN(mandate::TaskToken token, client->FetchTaskToken(task, audience, scopes));
  std::vector<std::string> proofs;
  for (const DpopRequest& r : requests) {
    ASSIGN_OR_RETURN(std::string proof, client->CreateProof(r.method, r.url, token.access_token));
    proofs.push_back(std::move(proof));
  }
  if (io.json()) {
    json proofs_json = json::array();
    for (size_t i = 0; i < requests.size(); ++i) {
      proofs_json.push_back(
          json{{"method", requests[i].method}, {"url", requests[i].url}, {"proof", proofs[i]}});
    }
    PrintJson(io.out, json{{"access_token", token.access_token},
                           {"token_type", token.token_type},
                           {"expires_in", token.expires_in},
                           {"scopes", VectorJson(token.scopes)},
                           {"jkt", token.jkt},
                           {"dpop_proofs", proofs_json}});
  } else {
    io.out << token.access_token << "\n"
           << "jkt: " << Printable(token.jkt) << "\n";
    for (const std::string& proof : proofs) {
      io.out << "dpop: " << proof << "\n";
    }
  }
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------- parsing

int RunCliImpl(int argc, char** argv, std::ostream& out, std::ostream& err) {
  GlobalOptions global;
  CLI::App app{"Mandate: workload identity broker for AI agents (admin and workload CLI)",
               "mandate"};
  // Global options are accepted before or after the command words (DESIGN.md §10): every
  // subcommand falls through to its parent for options it does not know.
  app.fallthrough();
  app.add_option("--admin-socket", global.admin_socket,
                 "Broker admin socket (env MANDATE_ADMIN_SOCKET)")
      ->envname("MANDATE_ADMIN_SOCKET")
      ->capture_default_str();
  app.add_option("--socket", global.socket,
                 "Workload API socket, unix:///path or /path (default: env "
                 "MANDATE_ENDPOINT_SOCKET, then SPIFFE_ENDPOINT_SOCKET)");
  app.add_option("--output", global.output, "Output format")
      ->check(CLI::IsMember({"text", "json"}))
      ->capture_default_str();

  std::function<absl::Status(const Io&)> action;
  auto set_action = [&](CLI::App* cmd, std::function<absl::Status(const Io&)> f) {
    cmd->callback([&action, f = std::move(f)] { action = f; });
  };

  // token generate
  auto* token = app.add_subcommand("token", "Join tokens for node agents");
  auto* token_generate = token->add_subcommand("generate", "Create a one-time join token");
  std::string token_spiffe_id;
  int64_t token_ttl = 0;
  token_generate
      ->add_option("--spiffe-id", token_spiffe_id,
                   "The node agent's ID: spiffe://TD/node/join/NAME")
      ->required();
  token_generate->add_option("--ttl", token_ttl, "Token lifetime in seconds (0: broker default)")
      ->check(CLI::NonNegativeNumber);
  set_action(token_generate,
             [&](const Io& io) { return TokenGenerate(io, token_spiffe_id, token_ttl); });

  // entry create|list|show|delete
  auto* entry = app.add_subcommand("entry", "Registration entries");
  EntryCreateArgs create;
  auto* entry_create = entry->add_subcommand("create", "Create a registration entry");
  entry_create->add_option("--parent-id", create.parent_id, "The node agent's SPIFFE ID")
      ->required();
  entry_create->add_option("--spiffe-id", create.spiffe_id, "The workload's SPIFFE ID")->required();
  entry_create->add_option("--selector", create.selectors, "Selector type:value (repeatable)")
      ->required();
  entry_create->add_option("--scope", create.scopes, "Task-scope entitlement (repeatable)");
  entry_create->add_option("--x509-ttl", create.x509_ttl, "X509-SVID TTL in seconds (0: default)")
      ->check(CLI::NonNegativeNumber);
  entry_create->add_option("--jwt-ttl", create.jwt_ttl, "JWT-SVID TTL in seconds (0: default)")
      ->check(CLI::NonNegativeNumber);
  entry_create
      ->add_option("--token-ttl", create.token_ttl, "Task token TTL in seconds (0: default)")
      ->check(CLI::NonNegativeNumber);
  set_action(entry_create, [&](const Io& io) { return EntryCreate(io, create); });

  int64_t entry_limit = 0;
  auto* entry_list = entry->add_subcommand("list", "List registration entries");
  entry_list->add_option("--limit", entry_limit, "Show at most N entries (default: all)")
      ->check(CLI::NonNegativeNumber);
  set_action(entry_list, [&](const Io& io) { return EntryList(io, entry_limit); });

  std::string entry_show_id;
  auto* entry_show = entry->add_subcommand("show", "Show one registration entry");
  entry_show->add_option("id", entry_show_id, "Entry ID")->required();
  set_action(entry_show, [&](const Io& io) { return EntryShow(io, entry_show_id); });

  std::string entry_delete_id;
  auto* entry_delete = entry->add_subcommand("delete", "Delete a registration entry");
  entry_delete->add_option("id", entry_delete_id, "Entry ID")->required();
  set_action(entry_delete, [&](const Io& io) { return EntryDelete(io, entry_delete_id); });
  entry->require_subcommand(0, 1);

  // agent list|evict|ban
  auto* agent = app.add_subcommand("agent", "Attested node agents");
  int64_t agent_limit = 0;
  auto* agent_list = agent->add_subcommand("list", "List attested agents");
  agent_list->add_option("--limit", agent_limit, "Show at most N agents (default: all)")
      ->check(CLI::NonNegativeNumber);
  set_action(agent_list, [&](const Io& io) { return AgentList(io, agent_limit); });
  std::string agent_evict_id;
  auto* agent_evict =
      agent->add_subcommand("evict", "Forget an agent; it must attest again to get an identity");
  agent_evict->add_option("id", agent_evict_id, "The agent's SPIFFE ID")->required();
  set_action(agent_evict, [&](const Io& io) { return AgentAction(io, agent_evict_id, false); });
  std::string agent_ban_id;
  auto* agent_ban = agent->add_subcommand("ban", "Ban an agent: it can never attest again");
  agent_ban->add_option("id", agent_ban_id, "The agent's SPIFFE ID")->required();
  set_action(agent_ban, [&](const Io& io) { return AgentAction(io, agent_ban_id, true); });
  agent->require_subcommand(0, 1);

  // bundle show
  auto* bundle = app.add_subcommand("bundle", "Trust bundle");
  std::string bundle_format = "pem";
  auto* bundle_show = bundle->add_subcommand("show", "Print the trust domain's bundle");
  bundle_show->add_option("--format", bundle_format, "pem (CA certificates) or jwks")
      ->check(CLI::IsMember({"pem", "jwks"}))
      ->capture_default_str();
  set_action(bundle_show, [&](const Io& io) { return BundleShow(io, bundle_format); });
  bundle->require_subcommand(0, 1);

  // audit list|verify
  auto* audit = app.add_subcommand("audit", "The broker's hash-chained audit log");
  AuditFilter audit_filter;
  auto* audit_list = audit->add_subcommand("list", "List audit records, oldest first");
  audit_list->add_option("--since", audit_filter.since,
                         "Only records at or after T (Unix seconds or RFC 3339)");
  audit_list->add_option("--spiffe-id", audit_filter.spiffe_id, "Only records about this ID");
  audit_list->add_option("--task", audit_filter.task_id, "Only records of this task");
  audit_list->add_option("--jti", audit_filter.jti,
                         "Only records of this credential (jti, or a certificate serial)");
  audit_list->add_option("--limit", audit_filter.limit, "At most N records")
      ->check(CLI::Range(int64_t{1}, int64_t{10000}))
      ->capture_default_str();
  set_action(audit_list, [&](const Io& io) { return AuditList(io, audit_filter); });
  auto* audit_verify = audit->add_subcommand(
      "verify", "Recompute every audit chain; exits non-zero when one is broken");
  bool audit_verify_strict = false;
  audit_verify->add_flag("--strict", audit_verify_strict,
                         "Also exit non-zero when records are not vouched for (found in the "
                         "store past the last signed checkpoint at a broker start)");
  set_action(audit_verify, [&](const Io& io) { return AuditVerify(io, audit_verify_strict); });
  audit->require_subcommand(0, 1);

  // fetch x509|jwt (Workload API)
  auto* fetch = app.add_subcommand("fetch", "Fetch this process's SVIDs from the Workload API");
  std::string fetch_write_dir;
  auto* fetch_x509 = fetch->add_subcommand("x509", "Print (or write) the X509-SVID");
  fetch_x509->add_option("--write", fetch_write_dir,
                         "Write svid.pem, svid.key (0600) and bundle.pem into DIR");
  set_action(fetch_x509, [&](const Io& io) { return FetchX509(io, fetch_write_dir); });
  std::vector<std::string> fetch_audiences;
  std::string fetch_spiffe_id;
  auto* fetch_jwt = fetch->add_subcommand("jwt", "Print a JWT-SVID");
  fetch_jwt->add_option("--audience", fetch_audiences, "Audience (repeatable)")->required();
  fetch_jwt->add_option("--spiffe-id", fetch_spiffe_id,
                        "Which identity, when this process has several");
  set_action(fetch_jwt,
             [&](const Io& io) { return FetchJwt(io, fetch_audiences, fetch_spiffe_id); });
  fetch->require_subcommand(0, 1);

  // validate jwt (Workload API)
  auto* validate = app.add_subcommand("validate", "Validate credentials with the Workload API");
  std::string validate_audience;
  std::string validate_token;
  auto* validate_jwt = validate->add_subcommand("jwt", "Validate a JWT-SVID");
  validate_jwt->add_option("--audience", validate_audience, "Expected audience")->required();
  validate_jwt->add_option("--token", validate_token, "The JWT-SVID, or - to read standard input")
      ->required();
  set_action(validate_jwt,
             [&](const Io& io) { return ValidateJwt(io, validate_audience, validate_token); });
  validate->require_subcommand(0, 1);

  // task start|end|token (Workload API)
  auto* task = app.add_subcommand("task", "Declared tasks and their DPoP-bound tokens");
  TaskStartArgs task_start_args;
  auto* task_start = task->add_subcommand("start", "Declare a task");
  task_start->add_option("--purpose", task_start_args.purpose, "What the task is for")->required();
  task_start->add_option("--scope", task_start_args.scopes, "Scope (repeatable)")->required();
  task_start->add_option("--audience", task_start_args.audiences, "Audience (repeatable)")
      ->required();
  task_start->add_option("--ttl", task_start_args.ttl, "Lifetime in seconds (0: broker default)")
      ->check(CLI::NonNegativeNumber);
  task_start->add_option("--spiffe-id", task_start_args.spiffe_id,
                         "Which identity, when this process has several");
  task_start->add_flag("--wait", task_start_args.wait,
                       "When the task needs a human's approval, wait until it is decided; exit "
                       "non-zero when it is denied or expires");
  task_start
      ->add_option("--wait-timeout", task_start_args.wait_timeout,
                   "With --wait: give up after this many seconds (0: until decided or expired)")
      ->check(CLI::NonNegativeNumber);
  set_action(task_start, [&](const Io& io) { return TaskStart(io, task_start_args); });
  std::string task_id;
  std::string task_spiffe_id;
  auto* task_end = task->add_subcommand("end", "End a task");
  task_end->add_option("id", task_id, "Task ID")->required();
  task_end->add_option("--spiffe-id", task_spiffe_id,
                       "Which identity, when this process has several");
  set_action(task_end, [&](const Io& io) { return TaskEnd(io, task_id, task_spiffe_id); });
  std::string task_token_audience;
  std::vector<std::string> task_token_scopes;
  auto* task_token = task->add_subcommand("token", "Print a DPoP-bound token for a task");
  task_token->add_option("id", task_id, "Task ID")->required();
  task_token->add_option("--audience", task_token_audience, "One of the task's audiences")
      ->required();
  task_token->add_option("--scope", task_token_scopes,
                         "Scope (repeatable; default: all of the task's)");
  std::vector<std::string> task_token_dpop_requests;
  task_token
      ->add_option(
          "--dpop-request", task_token_dpop_requests,
          "\"METHOD URL\" of an upstream request, e.g. \"GET https://api.example.org/v1/x\": "
          "also print a DPoP proof for it, bound to the token and made with its key "
          "(repeatable; each proof is single-use and accepted for about 60 s)")
      ->allow_extra_args(false);
  task_token->add_option("--spiffe-id", task_spiffe_id,
                         "Which identity, when this process has several");
  set_action(task_token, [&](const Io& io) {
    return TaskTokenCommand(io, task_id, task_token_audience, task_token_scopes,
                            task_token_dpop_requests, task_spiffe_id);
  });
  task->require_subcommand(0, 1);

  // approval list|show|approve|deny (admin)
  auto* approval = app.add_subcommand("approval", "Task declarations awaiting a human's approval");
  std::string approval_status;
  int64_t approval_limit = 0;
  auto* approval_list = approval->add_subcommand("list", "List approvals, oldest first");
  approval_list
      ->add_option("--status", approval_status, "Only approvals with this status (default: all)")
      ->check(CLI::IsMember({"pending", "approved", "denied", "expired"}));
  approval_list->add_option("--limit", approval_limit, "Show at most N approvals (default: all)")
      ->check(CLI::NonNegativeNumber);
  set_action(approval_list,
             [&](const Io& io) { return ApprovalList(io, approval_status, approval_limit); });
  std::string approval_id;
  auto* approval_show = approval->add_subcommand(
      "show", "Show one approval: the task, who asked, and the whole policy input document");
  approval_show->add_option("id", approval_id, "Approval ID (appr_...)")->required();
  set_action(approval_show, [&](const Io& io) { return ApprovalShow(io, approval_id); });
  std::string approval_reason;
  auto* approval_approve =
      approval->add_subcommand("approve", "Approve: the task becomes usable for its lifetime");
  approval_approve->add_option("id", approval_id, "Approval ID (appr_...)")->required();
  approval_approve->add_option("--reason", approval_reason, "Why (recorded in the audit log)");
  set_action(approval_approve,
             [&](const Io& io) { return ApprovalDecide(io, approval_id, true, approval_reason); });
  auto* approval_deny = approval->add_subcommand("deny", "Deny: the task is refused for good");
  approval_deny->add_option("id", approval_id, "Approval ID (appr_...)")->required();
  approval_deny->add_option("--reason", approval_reason,
                            "Why (recorded in the audit log and shown to the agent)");
  set_action(approval_deny,
             [&](const Io& io) { return ApprovalDecide(io, approval_id, false, approval_reason); });
  approval->require_subcommand(0, 1);

  // policy reload (admin)
  auto* policy = app.add_subcommand("policy", "The broker's policy hook");
  auto* policy_reload =
      policy->add_subcommand("reload",
                             "Re-read --policy-file (the rules in force stay if it "
                             "does not load)");
  set_action(policy_reload, [&](const Io& io) { return PolicyReload(io); });
  policy->require_subcommand(0, 1);

  token->require_subcommand(0, 1);
  app.require_subcommand(0, 1);

  try {
    app.parse(argc, argv);
  } catch (const CLI::ParseError& e) {
    int code = app.exit(e, out, err);
    return code == 0 ? 0 : 1;
  }
  if (!action) {
    // A command group without its subcommand (or nothing at all): name the choices.
    std::string path = "mandate";
    const CLI::App* group = &app;
    while (true) {
      std::vector<const CLI::App*> parsed =
          group->get_subcommands([](const CLI::App* sub) { return sub->parsed(); });
      if (parsed.empty()) {
        break;
      }
      group = parsed.front();
      path += " " + group->get_name();
    }
    std::vector<std::string> choices;
    for (const CLI::App* sub : group->get_subcommands({})) {
      choices.push_back(sub->get_name());
    }
    err << path << ": missing command; choose one of: " << absl::StrJoin(choices, ", ") << " (run "
        << path << " --help)\n";
    return 1;
  }
  Io io{out, global, err};
  absl::Status status = action(io);
  if (!status.ok()) {
    err << "mandate: " << status.message() << "\n";
    return 1;
  }
  return 0;
}

}  // namespace

int RunCli(int argc, char** argv, std::ostream& out, std::ostream& err) {
  try {
    return RunCliImpl(argc, argv, out, err);
  } catch (const std::exception& e) {
    err << "mandate: internal error: " << e.what() << "\n";
    return 1;
  } catch (...) {
    err << "mandate: internal error\n";
    return 1;
  }
}

}  // namespace mandate::cli
