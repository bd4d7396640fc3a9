// Minimal stand-in for Google Benchmark's API (used only when libbenchmark-dev is absent):
// BENCHMARK(fn)->Arg(x)->Unit(u), State with range-for iteration, state.range(0), SetBytesProcessed,
// DoNotOptimize, BENCHMARK_MAIN. Reports the median of 9 repeats per case.
#pragma once
#include <algorithm>
#include <chrono>
#include <cstdint>
#include <cstdio>
#include <functional>
#include <string>
#include <vector>

namespace benchmark {
enum TimeUnit { kNanosecond, kMicrosecond, kMillisecond };

class State {
 public:
  State(int64_t arg, int64_t iterations) : arg_(arg), iterations_(iterations) {}
  int64_t range(int) const { return arg_; }
  void SetBytesProcessed(int64_t bytes) { bytes_ = bytes; }
  void SetLabel(const std::string&) {}
  void SkipWithError(const char* message) { skipped_ = message; }
  std::string skipped_;
  void PauseTiming() {}
  void ResumeTiming() {}
  int64_t iterations() const { return iterations_; }
  struct Iterator {
    int64_t left;
    bool operator!=(const Iterator&) const { return left > 0; }
    void operator++() { --left; }
    int operator*() const { return 0; }
  };
  Iterator begin() { return {iterations_}; }
  Iterator end() { return {0}; }
  int64_t bytes_ = 0;

 private:
  int64_t arg_, iterations_;
};

template <class T>
inline void DoNotOptimize(T const& value) { asm volatile("" : : "r,m"(value) : "memory"); }

struct Case {
  std::string name;
  std::function<void(State&)> fn;
  std::vector<int64_t> args;
  TimeUnit unit = kNanosecond;
  Case* Arg(int64_t a) { args.push_back(a); return this; }
  Case* Unit(TimeUnit u) { unit = u; return this; }
  Case* UseRealTime() { return this; }
};

inline std::vector<Case*>& registry() { static std::vector<Case*> cases; return cases; }
inline Case* Register(const char* name, void (*fn)(State&)) {
  registry().push_back(new Case{name, fn, {}, kNanosecond});
  return registry().back();
}

inline int RunAll() {
  for (Case* c : registry()) {
    if (c->args.empty()) c->args.push_back(0);
    for (int64_t arg : c->args) {
      {
        State probe(arg, 0);
        c->fn(probe);
        if (!probe.skipped_.empty()) {
          std::printf("%s/%lld skipped: %s\n", c->name.c_str(), static_cast<long long>(arg), probe.skipped_.c_str());
          continue;
        }
      }
      int64_t iters = 1;
      for (;;) {  // grow iterations until one repeat takes >= 20 ms
        State s(arg, iters);
        auto t0 = std::chrono::steady_clock::now();
        c->fn(s);
        double dt = std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count();
        if (dt >= 0.02 || iters >= (int64_t{1} << 30)) break;
        iters *= 2;
      }
      std::vector<double> per_iter;
      for (int r = 0; r < 9; ++r) {
        State s(arg, iters);
        auto t0 = std::chrono::steady_clock::now();
        c->fn(s);
        per_iter.push_back(std::chrono::duration<double>(std::chrono::steady_clock::now() - t0).count() / iters);
      }
      std::sort(per_iter.begin(), per_iter.end());
      double scale = c->unit == kMicrosecond ? 1e6 : c->unit == kMillisecond ? 1e3 : 1e9;
      const char* unit = c->unit == kMicrosecond ? "us" : c->unit == kMillisecond ? "ms" : "ns";
      std::printf("%s/%lld_median %12.3f %s\n", c->name.c_str(), static_cast<long long>(arg), per_iter[4] * scale, unit);
    }
  }
  return 0;
}
}  // namespace benchmark

#define LLMCAD_BENCH_CAT2(a, b) a##b
#define LLMCAD_BENCH_CAT(a, b) LLMCAD_BENCH_CAT2(a, b)
#define BENCHMARK(fn) static ::benchmark::Case* LLMCAD_BENCH_CAT(bench_case_, __LINE__) = ::benchmark::Register(#fn, fn)
#define BENCHMARK_MAIN() int main() { return ::benchmark::RunAll(); }
