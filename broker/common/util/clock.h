// Injectable time source so that expiry logic can be tested without sleeping.
#ifndef MANDATE_BROKER_COMMON_UTIL_CLOCK_H_
#define MANDATE_BROKER_COMMON_UTIL_CLOCK_H_

#include <atomic>
#include <chrono>
#include <cstdint>

namespace mandate {

// Thread-safe: implementations may be called from any thread.
class Clock {
 public:
  virtual ~Clock() = default;
  // Wall-clock time in seconds since the Unix epoch.
  virtual int64_t NowSeconds() const = 0;
  // Process-wide real clock; never null, never destroyed.
  static Clock& Real();
};

class RealClock final : public Clock {
 public:
  int64_t NowSeconds() const override {
    return std::chrono::duration_cast<std::chrono::seconds>(
               std::chrono::system_clock::now().time_since_epoch())
        .count();
  }
};

inline Clock& Clock::Real() {
  static RealClock* clock = new RealClock();
  return *clock;
}

// A clock that only moves when told to; for tests.
class FakeClock final : public Clock {
 public:
  explicit FakeClock(int64_t now) : now_(now) {}
  int64_t NowSeconds() const override { return now_.load(); }
  void Set(int64_t now) { now_.store(now); }
  void Advance(int64_t seconds) { now_.fetch_add(seconds); }

 private:
  std::atomic<int64_t> now_;
};

}  // namespace mandate

#endif  // MANDATE_BROKER_COMMON_UTIL_CLOCK_H_
