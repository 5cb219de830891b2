// A closed-loop load generator for the end-to-end benchmarks: N threads call an operation back to
// back for a fixed time and record every call's latency.
#ifndef MANDATE_TESTS_BENCH_LOAD_H_
#define MANDATE_TESTS_BENCH_LOAD_H_

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <thread>
#include <vector>

#include "absl/status/status.h"

namespace mandate::bench {

struct LoadResult {
  int concurrency = 0;
  int64_t ops = 0;  // successful calls
  int64_t errors = 0;
  double seconds = 0;
  double ops_per_s = 0;
  double p50_us = 0;
  double p99_us = 0;
  std::string first_error;  // for the report when errors > 0
};

// The q-quantile (0..1) of sorted `values` (nearest rank).
inline double Quantile(const std::vector<double>& sorted, double q) {
  if (sorted.empty()) return 0;
  size_t rank = static_cast<size_t>(q * static_cast<double>(sorted.size() - 1) + 0.5);
  return sorted[std::min(rank, sorted.size() - 1)];
}

// Runs `op(thread_index)` from `concurrency` threads until `duration` has passed (or each thread
// made `max_ops_per_thread` calls, when non-zero). Latencies of successful and failed calls are
// both recorded: a fast failure must not flatter the percentiles, and errors are reported.
inline LoadResult RunLoad(int concurrency, std::chrono::milliseconds duration,
                          const std::function<absl::Status(int)>& op,
                          int64_t max_ops_per_thread = 0) {
  using Clock = std::chrono::steady_clock;
  std::vector<std::vector<double>> latencies(concurrency);
  std::vector<int64_t> errors(concurrency, 0);
  std::vector<std::string> first_errors(concurrency);
  std::atomic<int> ready{0};
  std::atomic<bool> go{false};
  Clock::time_point start, deadline;
  std::vector<std::thread> threads;
  threads.reserve(concurrency);
  for (int t = 0; t < concurrency; ++t) {
    threads.emplace_back([&, t] {
      latencies[t].reserve(1 << 16);
      ready.fetch_add(1);
      while (!go.load(std::memory_order_acquire)) std::this_thread::yield();
      for (int64_t i = 0; max_ops_per_thread == 0 || i < max_ops_per_thread; ++i) {
        Clock::time_point before = Clock::now();
        if (before >= deadline) break;
        absl::Status status = op(t);
        latencies[t].push_back(
            std::chrono::duration<double, std::micro>(Clock::now() - before).count());
        if (!status.ok()) {
          if (errors[t]++ == 0) first_errors[t] = status.ToString();
        }
      }
    });
  }
  while (ready.load() < concurrency) std::this_thread::yield();
  start = Clock::now();
  deadline = start + duration;
  go.store(true, std::memory_order_release);
  for (auto& thread : threads) thread.join();
  double seconds = std::chrono::duration<double>(Clock::now() - start).count();

  LoadResult result;
  result.concurrency = concurrency;
  result.seconds = seconds;
  std::vector<double> all;
  for (int t = 0; t < concurrency; ++t) {
    all.insert(all.end(), latencies[t].begin(), latencies[t].end());
    result.errors += errors[t];
    if (result.first_error.empty()) result.first_error = first_errors[t];
  }
  result.ops = static_cast<int64_t>(all.size()) - result.errors;
  result.ops_per_s = seconds > 0 ? static_cast<double>(result.ops) / seconds : 0;
  std::sort(all.begin(), all.end());
  result.p50_us = Quantile(all, 0.50);
  result.p99_us = Quantile(all, 0.99);
  return result;
}

}  // namespace mandate::bench

#endif  // MANDATE_TESTS_BENCH_LOAD_H_
