// Work split shared by the CPU kernels: `n` tasks over XLA's intra-op thread pool plus the calling
// thread. Tasks are claimed from a shared counter, so a pool thread that starts late finds nothing
// left and the caller never waits for a task nobody has begun.
#pragma once

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <functional>
#include <memory>
#include <thread>

#include "xla/ffi/api/ffi.h"

namespace vlm_jax {

struct Split {
  std::atomic<int> next{0};
  std::atomic<int> done{0};
  int n = 0;
  std::function<void(int)> fn;
};

inline void run_tasks(xla::ffi::ThreadPool& pool, int n, std::function<void(int)> fn) {
  auto state = std::make_shared<Split>();
  state->n = n;
  state->fn = std::move(fn);
  auto worker = [state]() {
    for (int i; (i = state->next.fetch_add(1)) < state->n;) {
      state->fn(i);
      state->done.fetch_add(1, std::memory_order_release);
    }
  };
  int helpers = int(std::min<int64_t>(pool.num_threads(), n)) - 1;
  for (int t = 0; t < helpers; ++t) pool.Schedule([worker]() { worker(); });
  worker();
  while (state->done.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

}  // namespace vlm_jax
