// The benchmark's verdict on its own results: a figure measured while operations failed (or
// when none succeeded) measures nothing, so such a run must fail rather than report it.
// Header-only so that mandate-bench and its unit test share it.
#ifndef MANDATE_TESTS_BENCH_REPORT_H_
#define MANDATE_TESTS_BENCH_REPORT_H_

#include <cstdint>
#include <nlohmann/json.hpp>
#include <string>
#include <vector>

namespace mandate::bench {

// One line per failed scenario of `scenarios` (an object: name -> result), naming it and why:
// any operation error, no successful operation, or a result that reports no operation count
// ("ops", or "rounds" for scenarios counted in rounds). Empty when every scenario is sound.
inline std::vector<std::string> FailedScenarios(const nlohmann::json& scenarios,
                                                const std::string& prefix = "") {
  std::vector<std::string> failed;
  if (!scenarios.is_object()) return {prefix + "results: not an object"};
  for (const auto& [name, result] : scenarios.items()) {
    const std::string who = prefix + name;
    if (!result.is_object()) {
      failed.push_back(who + ": no result");
      continue;
    }
    const nlohmann::json errors_field = result.value("errors", nlohmann::json(0));
    const int64_t errors = errors_field.is_number_integer() ? errors_field.get<int64_t>() : -1;
    int64_t succeeded = -1;
    if (result.contains("ops") && result["ops"].is_number_integer()) {
      succeeded = result["ops"].get<int64_t>();
    } else if (result.contains("rounds") && result["rounds"].is_number_integer()) {
      succeeded = result["rounds"].get<int64_t>() - std::max<int64_t>(errors, 0);
    }
    if (errors != 0) {
      std::string line =
          who + ": " + (errors < 0 ? "unreadable" : std::to_string(errors)) + " operation error(s)";
      if (result.contains("first_error") && result["first_error"].is_string()) {
        line += "; first: " + result["first_error"].get<std::string>();
      }
      failed.push_back(line);
    } else if (succeeded < 0) {
      failed.push_back(who + ": reports no operation count (ops or rounds)");
    } else if (succeeded == 0) {
      failed.push_back(who + ": no operation succeeded");
    }
  }
  return failed;
}

}  // namespace mandate::bench

#endif  // MANDATE_TESTS_BENCH_REPORT_H_
