#include "broker/server/policy/rules_policy.h"

#include <spdlog/spdlog.h>

#include <algorithm>
#include <array>
#include <optional>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "absl/strings/string_view.h"
#include "broker/common/config/toml_document.h"
#include "broker/common/store/store.h"
#include "broker/common/util/status_macros.h"
#include "broker/server/metrics/metrics.h"
#include "broker/server/policy/execution_caps.h"
#include "broker/server/policy/rules_glob.h"

namespace mandate::broker::policy {
namespace {

using config::TomlDocument;
using config::TomlString;
using config::TomlTableReader;
using config::TomlValue;

absl::string_view AbslView(std::string_view text) { return {text.data(), text.size()}; }

constexpr size_t kMaxRuleNameLength = 64;
// Agent-controlled text quoted in a reason is cut to this many bytes.
constexpr size_t kMaxQuotedLength = 200;

uint32_t KindBit(IssuanceKind kind) { return 1u << static_cast<unsigned>(kind); }
constexpr uint32_t kAllKinds = (1u << std::size(kAllIssuanceKinds)) - 1;

constexpr std::array<std::string_view, 7> kDayNames = {"mon", "tue", "wed", "thu",
                                                       "fri", "sat", "sun"};

// Days of the week as bits (bit 0 = Monday), minutes of the UTC day.
struct TimeWindow {
  uint8_t days = 0x7f;
  int start = 0;     // minute of the day, 0..1439
  int end = 0;       // 0..1440, != start; end < start: the window runs past midnight
  std::string text;  // as written, for reasons: "mon,tue 08:00-18:00 UTC"

  bool Contains(int64_t now) const {
    int64_t day = now / 86400;
    int64_t second = now % 86400;
    if (second < 0) {
      second += 86400;
      --day;
    }
    const int minute = static_cast<int>(second / 60);
    const int weekday = static_cast<int>(((day + 3) % 7 + 7) % 7);  // 1970-01-01 was a Thursday
    const int yesterday = (weekday + 6) % 7;
    auto on = [this](int d) { return (days >> d) & 1; };
    if (start < end) return on(weekday) && minute >= start && minute < end;
    return (on(weekday) && minute >= start) || (on(yesterday) && minute < end);
  }
};

struct Rule {
  std::string name;
  int64_t line = 0;
  bool allow = false;
  std::string reason;  // the decision's reason: as written, else one naming the rule
  uint32_t kinds = kAllKinds;
  std::optional<Glob> spiffe_id;       // absent: any SPIFFE ID
  std::vector<std::string> selectors;  // all must be among the input's
  // Constraints (allow rules only).
  std::optional<std::vector<Glob>> audiences;
  std::optional<std::vector<Glob>> scopes;
  std::optional<int64_t> ttl_max;
  bool require_approval = false;
  std::optional<TimeWindow> time_window;
  std::optional<int64_t> max_tokens_per_task;
  std::optional<int64_t> max_issuances_per_minute;
};

bool MatchesAny(const std::vector<Glob>& globs, std::string_view text) {
  for (const Glob& glob : globs) {
    if (glob.Matches(text)) return true;
  }
  return false;
}

std::string Quoted(std::string_view text) {
  if (text.size() <= kMaxQuotedLength) return absl::StrCat("'", AbslView(text), "'");
  // Cut at a UTF-8 character boundary: a reason that is not valid UTF-8 could not be
  // written to the JSON audit log.
  size_t cut = kMaxQuotedLength;
  while (cut > 0 && (static_cast<unsigned char>(text[cut]) & 0xC0) == 0x80) --cut;
  return absl::StrCat("'", AbslView(text.substr(0, cut)), "...'");
}

PolicyDecision Deny(std::string reason) {
  PolicyDecision decision;
  decision.allow = false;
  decision.reason = std::move(reason);
  return decision;
}

// ---- Loading ----

// Parses "HH:MM" (00:00..23:59; "24:00" too when `end`) into minutes of the day.
std::optional<int> ParseClock(std::string_view text, bool end) {
  if (text.size() != 5 || text[2] != ':') return std::nullopt;
  for (size_t i : {0, 1, 3, 4}) {
    if (text[i] < '0' || text[i] > '9') return std::nullopt;
  }
  const int hours = (text[0] - '0') * 10 + (text[1] - '0');
  const int minutes = (text[3] - '0') * 10 + (text[4] - '0');
  if (minutes > 59) return std::nullopt;
  if (hours == 24 && minutes == 0 && end) return 24 * 60;
  if (hours > 23) return std::nullopt;
  return hours * 60 + minutes;
}

class RulesLoader {
 public:
  explicit RulesLoader(const TomlDocument& document) : document_(document) {}

  absl::StatusOr<std::shared_ptr<RulesPolicy::RuleSet>> Load();

 private:
  absl::StatusOr<Rule> LoadRule(const TomlValue& table, std::string path);
  absl::StatusOr<std::optional<std::vector<Glob>>> Globs(TomlTableReader& reader,
                                                         std::string_view key);
  absl::StatusOr<std::optional<int64_t>> Positive(TomlTableReader& reader, std::string_view key);
  absl::StatusOr<TimeWindow> LoadTimeWindow(const TomlValue& table, std::string path);

  const TomlDocument& document_;
};

}  // namespace

struct RulesPolicy::RuleSet {
  std::vector<Rule> rules;
  bool default_allow = false;
};

namespace {

absl::StatusOr<std::shared_ptr<RulesPolicy::RuleSet>> RulesLoader::Load() {
  auto set = std::make_shared<RulesPolicy::RuleSet>();
  TomlTableReader top(document_, document_.root(), "");
  ASSIGN_OR_RETURN(std::optional<std::string> default_effect, top.String("default"));
  if (default_effect.has_value()) {
    if (*default_effect != "allow" && *default_effect != "deny") {
      return top.Error("default", "must be \"allow\" or \"deny\"");
    }
    set->default_allow = *default_effect == "allow";
  }
  ASSIGN_OR_RETURN(std::optional<std::vector<const TomlValue*>> rules, top.TableArray("rule"));
  RETURN_IF_ERROR(top.CheckNoUnknownKeys());
  if (rules.has_value()) {
    for (size_t i = 0; i < rules->size(); ++i) {
      ASSIGN_OR_RETURN(Rule rule, LoadRule(*(*rules)[i], top.PathOf("rule", i)));
      for (const Rule& earlier : set->rules) {
        if (earlier.name == rule.name) {
          return document_.ErrorAt(
              (*rules)[i]->Find("name")->value.position(), top.PathOf("rule", i) + ".name",
              absl::StrCat("rule name '", rule.name, "' is already used on line ", earlier.line));
        }
      }
      set->rules.push_back(std::move(rule));
    }
  }
  return set;
}

absl::StatusOr<std::optional<std::vector<Glob>>> RulesLoader::Globs(TomlTableReader& reader,
                                                                    std::string_view key) {
  ASSIGN_OR_RETURN(std::optional<std::vector<TomlString>> patterns, reader.StringArray(key));
  if (!patterns.has_value()) return std::nullopt;
  std::vector<Glob> globs;
  for (size_t i = 0; i < patterns->size(); ++i) {
    absl::StatusOr<Glob> glob = Glob::Compile((*patterns)[i].value);
    if (!glob.ok()) {
      return document_.ErrorAt((*patterns)[i].position, reader.PathOf(key, i),
                               absl::StrCat("invalid glob: ", glob.status().message()));
    }
    globs.push_back(*std::move(glob));
  }
  return globs;
}

absl::StatusOr<std::optional<int64_t>> RulesLoader::Positive(TomlTableReader& reader,
                                                             std::string_view key) {
  ASSIGN_OR_RETURN(std::optional<int64_t> value, reader.Integer(key));
  // The upper bound keeps window and expiry arithmetic far from overflow.
  if (value.has_value() && (*value < 1 || *value > 1'000'000'000)) {
    return reader.Error(key, "must be a whole number from 1 to 1000000000");
  }
  return value;
}

absl::StatusOr<TimeWindow> RulesLoader::LoadTimeWindow(const TomlValue& table, std::string path) {
  TomlTableReader reader(document_, table, std::move(path));
  TimeWindow window;
  ASSIGN_OR_RETURN(std::optional<std::vector<TomlString>> days, reader.StringArray("days"));
  std::string days_text = "every day";
  if (days.has_value()) {
    if (days->empty()) return reader.Error("days", "must name at least one day");
    window.days = 0;
    std::vector<std::string> names;
    for (size_t i = 0; i < days->size(); ++i) {
      auto it = std::find(kDayNames.begin(), kDayNames.end(), (*days)[i].value);
      if (it == kDayNames.end()) {
        return document_.ErrorAt((*days)[i].position, reader.PathOf("days", i),
                                 absl::StrCat("unknown day ", Quoted((*days)[i].value),
                                              "; expected mon, tue, wed, thu, fri, sat or sun"));
      }
      window.days |= static_cast<uint8_t>(1u << (it - kDayNames.begin()));
      names.push_back((*days)[i].value);
    }
    days_text = absl::StrJoin(names, ",");
  }
  ASSIGN_OR_RETURN(std::optional<std::string> start, reader.String("start"));
  ASSIGN_OR_RETURN(std::optional<std::string> end, reader.String("end"));
  RETURN_IF_ERROR(reader.CheckNoUnknownKeys());
  if (!start.has_value()) return reader.Error("start", "is required (\"HH:MM\", UTC)");
  if (!end.has_value()) return reader.Error("end", "is required (\"HH:MM\", UTC)");
  std::optional<int> start_minute = ParseClock(*start, /*end=*/false);
  if (!start_minute) return reader.Error("start", "must be a UTC time \"HH:MM\" (00:00 to 23:59)");
  std::optional<int> end_minute = ParseClock(*end, /*end=*/true);
  if (!end_minute) return reader.Error("end", "must be a UTC time \"HH:MM\" (00:00 to 24:00)");
  if (*end_minute == *start_minute) {
    return reader.Error("end", "equals start: the window would be empty");
  }
  window.start = *start_minute;
  window.end = *end_minute;
  window.text = absl::StrCat(days_text, " ", *start, "-", *end, " UTC");
  return window;
}

absl::StatusOr<Rule> RulesLoader::LoadRule(const TomlValue& table, std::string path) {
  TomlTableReader reader(document_, table, path);
  Rule rule;
  rule.line = table.position().line;

  ASSIGN_OR_RETURN(std::optional<std::string> name, reader.String("name"));
  if (!name.has_value()) return document_.ErrorAt(table.position(), path, "'name' is required");
  if (name->empty() || name->size() > kMaxRuleNameLength ||
      !std::all_of(name->begin(), name->end(), [](char c) {
        return (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') || (c >= '0' && c <= '9') ||
               c == '-' || c == '_' || c == '.';
      })) {
    return reader.Error("name", "must be 1 to 64 letters, digits, '-', '_' or '.'");
  }
  rule.name = *name;

  ASSIGN_OR_RETURN(std::optional<std::string> effect, reader.String("effect"));
  if (!effect.has_value()) {
    return document_.ErrorAt(table.position(), path,
                             "'effect' is required (\"allow\" or \"deny\")");
  }
  if (*effect != "allow" && *effect != "deny") {
    return reader.Error("effect", "must be \"allow\" or \"deny\"");
  }
  rule.allow = *effect == "allow";
  ASSIGN_OR_RETURN(std::optional<std::string> reason, reader.String("reason"));
  // Built once here, so a decision copies its reason instead of formatting it.
  rule.reason = reason.has_value() && !reason->empty()
                    ? *reason
                    : absl::StrCat(rule.allow ? "allowed" : "denied", " by rule '", rule.name, "'");

  // What the rule matches.
  ASSIGN_OR_RETURN(std::optional<std::string> spiffe_id, reader.String("spiffe_id"));
  if (spiffe_id.has_value()) {
    absl::StatusOr<Glob> glob = Glob::Compile(*spiffe_id);
    if (!glob.ok()) {
      return reader.Error("spiffe_id", absl::StrCat("invalid glob: ", glob.status().message()));
    }
    rule.spiffe_id = *std::move(glob);
  }
  ASSIGN_OR_RETURN(std::optional<std::vector<TomlString>> selectors,
                   reader.StringArray("selectors"));
  if (selectors.has_value()) {
    for (size_t i = 0; i < selectors->size(); ++i) {
      const std::string& selector = (*selectors)[i].value;
      const size_t colon = selector.find(':');
      if (colon == 0 || colon == std::string::npos || colon + 1 == selector.size()) {
        return document_.ErrorAt((*selectors)[i].position, reader.PathOf("selectors", i),
                                 "must be \"type:value\"");
      }
      rule.selectors.push_back(selector);
    }
  }
  ASSIGN_OR_RETURN(std::optional<std::vector<TomlString>> kinds, reader.StringArray("kinds"));
  if (kinds.has_value()) {
    if (kinds->empty())
      return reader.Error("kinds", "must name at least one kind (or be left out)");
    rule.kinds = 0;
    for (size_t i = 0; i < kinds->size(); ++i) {
      absl::StatusOr<IssuanceKind> kind = ParseIssuanceKind((*kinds)[i].value);
      if (!kind.ok()) {
        return document_.ErrorAt(
            (*kinds)[i].position, reader.PathOf("kinds", i),
            absl::StrCat(Quoted((*kinds)[i].value), ": ", kind.status().message()));
      }
      rule.kinds |= KindBit(*kind);
    }
  }

  // Constraints.
  ASSIGN_OR_RETURN(rule.audiences, Globs(reader, "audiences"));
  ASSIGN_OR_RETURN(rule.scopes, Globs(reader, "scopes"));
  ASSIGN_OR_RETURN(rule.ttl_max, Positive(reader, "ttl_max"));
  ASSIGN_OR_RETURN(std::optional<bool> require_approval, reader.Boolean("require_approval"));
  rule.require_approval = require_approval.value_or(false);
  ASSIGN_OR_RETURN(const TomlValue* window, reader.Table("time_window"));
  if (window != nullptr) {
    ASSIGN_OR_RETURN(rule.time_window, LoadTimeWindow(*window, reader.PathOf("time_window")));
  }
  ASSIGN_OR_RETURN(rule.max_tokens_per_task, Positive(reader, "max_tokens_per_task"));
  ASSIGN_OR_RETURN(rule.max_issuances_per_minute, Positive(reader, "max_issuances_per_minute"));
  RETURN_IF_ERROR(reader.CheckNoUnknownKeys());

  if (!rule.allow) {
    for (std::string_view key :
         {"audiences", "scopes", "ttl_max", "require_approval", "time_window",
          "max_tokens_per_task", "max_issuances_per_minute"}) {
      if (reader.Find(key) != nullptr) {
        return reader.Error(key, "only an allow rule has constraints (a deny rule just denies)");
      }
    }
  }
  // Constraints that could never apply are mistakes, not no-ops.
  if (rule.require_approval && (rule.kinds & KindBit(IssuanceKind::kTask)) == 0) {
    return reader.Error("require_approval",
                        "applies to task declarations, but the rule's kinds leave out \"task\"");
  }
  if (rule.max_tokens_per_task && (rule.kinds & KindBit(IssuanceKind::kTaskToken)) == 0) {
    return reader.Error("max_tokens_per_task",
                        "counts task tokens, but the rule's kinds leave out \"task_token\"");
  }
  return rule;
}

}  // namespace

// ---- The hook ----

RulesPolicy::RulesPolicy(std::string path, store::Store& store, const Clock& clock,
                         metrics::BrokerMetrics* metrics, std::shared_ptr<const RuleSet> rules)
    : path_(std::move(path)),
      store_(store),
      clock_(clock),
      metrics_(metrics),
      rules_(std::move(rules)) {}

RulesPolicy::~RulesPolicy() = default;

namespace {
absl::StatusOr<std::shared_ptr<RulesPolicy::RuleSet>> LoadRuleSet(const std::string& path) {
  ASSIGN_OR_RETURN(TomlDocument document, TomlDocument::ParseFile(path));
  return RulesLoader(document).Load();
}
}  // namespace

absl::StatusOr<std::unique_ptr<RulesPolicy>> RulesPolicy::Load(std::string path,
                                                               store::Store& store,
                                                               const Clock& clock,
                                                               metrics::BrokerMetrics* metrics) {
  ASSIGN_OR_RETURN(std::shared_ptr<RuleSet> rules, LoadRuleSet(path));
  spdlog::info("policy rules loaded from {}: {} rules, default {}", path, rules->rules.size(),
               rules->default_allow ? "allow" : "deny");
  return std::unique_ptr<RulesPolicy>(
      new RulesPolicy(std::move(path), store, clock, metrics, std::move(rules)));
}

absl::Status RulesPolicy::Reload() {
  absl::MutexLock reload(&reload_mu_);
  // The caller logs the outcome (main logs SIGHUP reloads), so nothing is logged here.
  absl::StatusOr<std::shared_ptr<RuleSet>> rules = LoadRuleSet(path_);
  if (!rules.ok()) return rules.status();
  std::shared_ptr<const RuleSet> old;
  {
    absl::MutexLock lock(&mu_);
    old = std::exchange(rules_, *std::move(rules));
  }
  return absl::OkStatus();  // `old` is freed here, outside the lock
}

std::shared_ptr<const RulesPolicy::RuleSet> RulesPolicy::Current() const {
  absl::ReaderMutexLock lock(&mu_);
  return rules_;
}

size_t RulesPolicy::rule_count() const { return Current()->rules.size(); }

void RulesPolicy::MaybePruneCounters(int64_t now) {
  int64_t next = next_prune_.load(std::memory_order_relaxed);
  if (now < next) return;
  if (!next_prune_.compare_exchange_strong(next, now + caps::kWindowSeconds)) return;
  if (absl::Status status = store_.PruneCounters(now); !status.ok()) {
    // Only storage is lost: expired counters are never consulted (their keys are not reused).
    spdlog::warn("policy: pruning expired cap counters failed: {}", status.ToString());
  }
}

absl::StatusOr<std::optional<PolicyDecision>> RulesPolicy::CountCap(
    std::string_view cap, const std::string& key, int64_t limit, int64_t expires_at,
    std::string reason, const std::string& rule, const PolicyInput& input,
    std::chrono::steady_clock::time_point deadline) {
  if (std::chrono::steady_clock::now() >= deadline) {
    return absl::DeadlineExceededError("policy rules: deadline passed before counting a cap");
  }
  absl::StatusOr<int64_t> count = store_.IncrementCounterBelow(key, limit, expires_at);
  if (count.ok()) return std::nullopt;
  if (!absl::IsResourceExhausted(count.status())) {
    return absl::UnavailableError(absl::StrCat("policy rules: counting ", AbslView(cap),
                                               " failed: ", count.status().message()));
  }
  spdlog::warn("policy: execution cap crossed: rule={} cap={} limit={} kind={} spiffe_id={}{}{}",
               rule, cap, limit, IssuanceKindName(input.kind), input.spiffe_id,
               input.task.has_value() ? " task=" : "",
               input.task.has_value() ? input.task->id : "");
  if (metrics_ != nullptr) metrics_->CountCapCrossed(cap);
  return Deny(std::move(reason));
}

absl::StatusOr<PolicyDecision> RulesPolicy::Check(const PolicyInput& input,
                                                  std::chrono::steady_clock::time_point deadline) {
  const std::shared_ptr<const RuleSet> set = Current();
  const uint32_t kind = KindBit(input.kind);
  const Rule* matched = nullptr;
  for (const Rule& rule : set->rules) {
    if ((rule.kinds & kind) == 0) continue;
    if (rule.spiffe_id.has_value() && !rule.spiffe_id->Matches(input.spiffe_id)) continue;
    bool selectors_match = true;
    for (const std::string& selector : rule.selectors) {
      if (std::find(input.selectors.begin(), input.selectors.end(), selector) ==
          input.selectors.end()) {
        selectors_match = false;
        break;
      }
    }
    if (!selectors_match) continue;
    matched = &rule;
    break;
  }
  if (matched == nullptr) {
    PolicyDecision decision;
    decision.allow = set->default_allow;
    decision.reason =
        set->default_allow ? "no rule matched; default allow" : "no rule matched; default deny";
    return decision;
  }
  const Rule& rule = *matched;
  if (!rule.allow) {
    return Deny(rule.reason);
  }

  const int64_t now = clock_.NowSeconds();
  if (rule.time_window.has_value() && !rule.time_window->Contains(now)) {
    return Deny(absl::StrCat("rule '", rule.name, "': outside its time window (",
                             rule.time_window->text, ")"));
  }
  // What is asked for: for a task declaration, the task's own audiences and scopes too (the
  // pipeline may carry them only there).
  const std::vector<std::string>* task_audiences = nullptr;
  const std::vector<std::string>* task_scopes = nullptr;
  if (input.kind == IssuanceKind::kTask && input.task.has_value()) {
    task_audiences = &input.task->audiences;
    task_scopes = &input.task->scopes;
  }
  if (rule.audiences.has_value()) {
    for (const std::vector<std::string>* list : {&input.audience, task_audiences}) {
      if (list == nullptr) continue;
      for (const std::string& audience : *list) {
        if (!MatchesAny(*rule.audiences, audience)) {
          return Deny(absl::StrCat("rule '", rule.name, "': audience ", Quoted(audience),
                                   " is not allowed"));
        }
      }
    }
  }
  PolicyDecision decision;
  decision.allow = true;
  decision.reason = rule.reason;
  if (rule.scopes.has_value()) {
    std::vector<std::string> kept;
    bool requested = false;
    for (const std::vector<std::string>* list : {&input.scopes, task_scopes}) {
      if (list == nullptr) continue;
      for (const std::string& scope : *list) {
        requested = true;
        if (MatchesAny(*rule.scopes, scope) &&
            std::find(kept.begin(), kept.end(), scope) == kept.end()) {
          kept.push_back(scope);
        }
      }
    }
    if (requested && kept.empty()) {
      return Deny(absl::StrCat("rule '", rule.name, "': none of the requested scopes is allowed"));
    }
    decision.scopes = std::move(kept);
  }
  decision.ttl_max = rule.ttl_max;
  // Approval is a property of the task: tokens under an approved task are not held again.
  decision.require_approval = rule.require_approval && input.kind == IssuanceKind::kTask;

  // Caps last, so only requests the rest of the rule allowed are counted. The per-minute cap
  // goes first: a task at its token cap then costs no place in the minute's count, whereas
  // the other order would let a retry loop spend a task's (permanent) budget.
  const bool counts_tokens =
      rule.max_tokens_per_task.has_value() && input.kind == IssuanceKind::kTaskToken;
  if (counts_tokens && (!input.task.has_value() || input.task->id.empty())) {
    return absl::InvalidArgumentError(
        "policy rules: a task token request without a task id cannot be counted");
  }
  if (rule.max_issuances_per_minute.has_value() || counts_tokens) MaybePruneCounters(now);
  if (rule.max_issuances_per_minute.has_value()) {
    const int64_t window = caps::WindowStart(now);
    const int64_t limit = *rule.max_issuances_per_minute;
    ASSIGN_OR_RETURN(
        std::optional<PolicyDecision> denied,
        CountCap(
            "issuances_per_minute", caps::IssuancesPerMinuteKey(rule.name, input.spiffe_id, window),
            limit, window + caps::kWindowSeconds,
            absl::StrCat("execution cap: at most ", limit, limit == 1 ? " issuance" : " issuances",
                         " per minute (rule '", rule.name, "')"),
            rule.name, input, deadline));
    if (denied.has_value()) return *std::move(denied);
  }
  if (counts_tokens) {
    const int64_t limit = *rule.max_tokens_per_task;
    ASSIGN_OR_RETURN(
        std::optional<PolicyDecision> denied,
        CountCap("tokens_per_task", caps::TokensPerTaskKey(input.task->id), limit,
                 now + caps::kTaskCounterRetentionSeconds,
                 absl::StrCat("execution cap: at most ", limit, limit == 1 ? " token" : " tokens",
                              " per task (rule '", rule.name, "')"),
                 rule.name, input, deadline));
    if (denied.has_value()) return *std::move(denied);
  }
  return decision;
}

}  // namespace mandate::broker::policy
