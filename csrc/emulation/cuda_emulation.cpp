// The runtime of the CUDA emulation (see cuda_emulation.h): a pool of OS threads that
// runs the threads of one block at a time, concurrently, with a real barrier.
#include "cuda_emulation.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <array>
#include <cstdio>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <map>
#include <new>
#include <string>
#include <thread>

thread_local dim3 threadIdx;
thread_local dim3 blockIdx;
thread_local dim3 blockDim;
thread_local dim3 gridDim;

namespace resattn {
namespace emu {
namespace {

constexpr unsigned int kMaxThreadsPerBlock = 1024;
constexpr std::size_t kMaxDynamicSharedBytes = 48 * 1024;  // without cudaFuncSetAttribute opt-in
constexpr unsigned char kSharedPoison = 0xFF;
constexpr std::size_t kMaxLogged = 4096;  // the launch log keeps the most recent launches

// A reusable barrier whose party shrinks when a thread returns from the kernel.
class Barrier {
 public:
  void reset(int parties) {
    std::lock_guard<std::mutex> lock(mu_);
    parties_ = parties;
    arrived_ = 0;
  }

  void arrive_and_wait() {
    std::unique_lock<std::mutex> lock(mu_);
    const std::uint64_t phase = phase_;
    if (++arrived_ >= parties_) {
      release();
      return;
    }
    cv_.wait(lock, [&] { return phase_ != phase; });
  }

  // A thread that returned: the others no longer wait for it.
  void drop() {
    std::lock_guard<std::mutex> lock(mu_);
    --parties_;
    if (parties_ > 0 && arrived_ >= parties_) release();
  }

 private:
  void release() {  // mu_ held
    arrived_ = 0;
    ++phase_;
    cv_.notify_all();
  }

  std::mutex mu_;
  std::condition_variable cv_;
  int parties_ = 0;
  int arrived_ = 0;
  std::uint64_t phase_ = 0;
};

// The lanes of one warp and their exchanges (warp_exchange). An exchange is identified by
// its mask: the lanes it names arrive, the last one releases them all. Values are double
// buffered by the exchange's parity: a lane can offer to exchange g + 2 (same buffer as
// g) only after every lane arrived at g + 1, i.e. after every lane read exchange g.
class Warp {
 public:
  // Before a block starts (no lane running): lanes >= `lanes` do not exist.
  void reset(int lanes) {
    std::lock_guard<std::mutex> lock(mu_);
    gone_ = lanes >= 32 ? 0u : ~((1u << lanes) - 1u);
    rounds_.clear();
  }

  // A lane that returned from the kernel: exchanges that name it can no longer complete.
  void leave(int lane) {
    std::lock_guard<std::mutex> lock(mu_);
    gone_ |= 1u << lane;
    cv_.notify_all();
  }

  std::uint64_t exchange(const char* op, int lane, unsigned int mask, std::uint64_t bits, int src) {
    std::unique_lock<std::mutex> lock(mu_);
    const unsigned int me = 1u << lane;
    TORCH_CHECK(mask & me, "resattn_fast emulation: ", op, " called by lane ", lane,
                " with mask 0x", hex(mask), " that does not name it (undefined on a GPU)");
    TORCH_CHECK((mask >> src) & 1u, "resattn_fast emulation: ", op, " on lane ", lane,
                " reads lane ", src, ", which mask 0x", hex(mask), " does not name");
    Round& r = rounds_[mask];
    const std::uint64_t gen = r.generation;
    r.values[gen & 1][lane] = bits;
    r.arrived |= me;
    if (r.arrived == mask) {
      r.arrived = 0;
      ++r.generation;
      cv_.notify_all();
    } else {
      cv_.wait(lock, [&] { return r.generation != gen || (mask & gone_ & ~r.arrived) != 0; });
      if (r.generation == gen) {
        const unsigned int missing = mask & gone_ & ~r.arrived;
        int l = 0;
        while (!((missing >> l) & 1u)) ++l;
        r.arrived &= ~me;
        TORCH_CHECK(false, "resattn_fast emulation: ", op, " with mask 0x", hex(mask), " waits for lane ",
                    l, ", which does not exist or has returned (a hang or undefined on a GPU)");
      }
    }
    return r.values[gen & 1][src];
  }

 private:
  struct Round {
    unsigned int arrived = 0;
    std::uint64_t generation = 0;
    std::uint64_t values[2][32] = {};
  };

  static std::string hex(unsigned int v) {
    char buf[16];
    std::snprintf(buf, sizeof(buf), "%08x", v);
    return buf;
  }

  std::mutex mu_;
  std::condition_variable cv_;
  unsigned int gone_ = 0;
  std::map<unsigned int, Round> rounds_;
};

struct Block {
  const std::function<void()>* body = nullptr;
  dim3 grid, block, index;
  unsigned char* shared = nullptr;
  Barrier start;    // every thread of the block is running before any runs the kernel
  Barrier barrier;  // __syncthreads
  std::array<Warp, 32> warps;  // 1024 threads at most
};

thread_local Block* current_block = nullptr;
thread_local int current_linear = 0;  // the running thread's linear index in its block

// Persistent workers; worker t runs thread t (linear index) of every block.
class Pool {
 public:
  // Runs the threads of `block` and returns when all have returned; the first exception a
  // thread threw is rethrown here.
  void run(Block& block, int threads) {
    while (static_cast<int>(workers_.size()) < threads) {
      const int id = static_cast<int>(workers_.size());
      const std::uint64_t now = generation_;  // only this (launching) thread changes it
      workers_.emplace_back([this, id, now] { work(id, now); });
    }
    block.start.reset(threads);
    block.barrier.reset(threads);
    for (int w = 0; w < static_cast<int>(block.warps.size()); ++w) {
      block.warps[w].reset(std::min(std::max(threads - 32 * w, 0), 32));
    }
    std::unique_lock<std::mutex> lock(mu_);
    block_ = &block;
    active_ = threads;
    remaining_ = threads;
    error_ = nullptr;
    ++generation_;
    start_.notify_all();
    done_.wait(lock, [&] { return remaining_ == 0; });
    block_ = nullptr;
    if (error_) std::rethrow_exception(error_);
  }

 private:
  void work(int id, std::uint64_t seen) {
    for (;;) {
      Block* block;
      {
        std::unique_lock<std::mutex> lock(mu_);
        start_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        if (id >= active_) continue;
        block = block_;
      }
      const unsigned int bx = block->block.x, by = block->block.y;
      const unsigned int t = static_cast<unsigned int>(id);
      threadIdx = dim3(t % bx, (t / bx) % by, t / (bx * by));
      blockIdx = block->index;
      blockDim = block->block;
      gridDim = block->grid;
      current_block = block;
      current_linear = id;
      std::exception_ptr error;
      // The threads of a block start together: what they do before their first barrier is
      // as concurrent as between two barriers (for ThreadSanitizer too: no thread's start
      // is ordered after another's end).
      block->start.arrive_and_wait();
      try {
        (*block->body)();
      } catch (...) {
        error = std::current_exception();
      }
      block->barrier.drop();
      block->warps[id / 32].leave(id % 32);
      current_block = nullptr;
      std::lock_guard<std::mutex> lock(mu_);
      if (error && !error_) error_ = error;
      if (--remaining_ == 0) done_.notify_one();
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mu_;
  std::condition_variable start_, done_;
  std::uint64_t generation_ = 0;
  Block* block_ = nullptr;
  int active_ = 0;
  int remaining_ = 0;
  std::exception_ptr error_;
};

struct SharedDeleter {
  void operator()(unsigned char* p) const { ::operator delete[](p, std::align_val_t(16)); }
};

std::mutex& launch_mutex() {  // one launch at a time: a single, synchronous stream
  static std::mutex mu;
  return mu;
}

Pool& pool() {
  // Never destroyed: the workers wait for work until the process exits.
  static Pool* p = new Pool();
  return *p;
}

std::mutex log_mutex;
std::vector<LaunchRecord> log;
thread_local std::string last_error;

}  // namespace

Options& options() {
  static Options opts;
  return opts;
}

std::vector<LaunchRecord> launches() {
  std::lock_guard<std::mutex> lock(log_mutex);
  return log;
}

void clear_launches() {
  std::lock_guard<std::mutex> lock(log_mutex);
  log.clear();
}

unsigned char* dynamic_shared_memory() {
  TORCH_CHECK(current_block != nullptr, "resattn_fast emulation: shared memory outside a kernel");
  return current_block->shared;
}

int lane_id() { return current_linear % 32; }

std::uint64_t warp_exchange(const char* op, unsigned int mask, std::uint64_t bits, int src_lane) {
  TORCH_CHECK(current_block != nullptr, "resattn_fast emulation: ", op, " outside a kernel");
  TORCH_CHECK(src_lane >= 0 && src_lane < 32, "resattn_fast emulation: ", op, " source lane ",
              src_lane, " out of range");
  return current_block->warps[current_linear / 32].exchange(op, current_linear % 32, mask, bits,
                                                            src_lane);
}

void check_last_launch() {
  if (last_error.empty()) return;
  const std::string error = last_error;
  last_error.clear();
  TORCH_CHECK(false, "resattn_fast emulated CUDA launch failed: ", error);
}

std::string tidy_kernel_name(const char* pretty_function) {
  std::string s(pretty_function);
  // GCC: "... [with auto Kernel = ns::kernel<float, int, 4>; ...]"; Clang: "[Kernel = &ns::kernel<...>]"
  std::size_t start = s.find("Kernel = ");
  if (start == std::string::npos) return s;
  start += 9;
  if (start < s.size() && s[start] == '&') ++start;
  std::size_t end = s.find_first_of(";]", start);
  std::string name = s.substr(start, end == std::string::npos ? std::string::npos : end - start);
  // Drop the namespaces in front of the kernel's own name (never inside its template arguments).
  const std::size_t open = name.find('<');
  const std::size_t sep = name.rfind("::", open);
  if (sep != std::string::npos) name = name.substr(sep + 2);
  return name;
}

void run_grid(const char* kernel, dim3 grid, dim3 block, std::size_t shared_bytes,
              const std::function<void()>& thread_body) {
  const std::uint64_t threads = static_cast<std::uint64_t>(block.x) * block.y * block.z;
  const std::uint64_t blocks = static_cast<std::uint64_t>(grid.x) * grid.y * grid.z;
  if (threads == 0 || threads > kMaxThreadsPerBlock || blocks == 0 || grid.x > 2147483647u ||
      grid.y > 65535u || grid.z > 65535u) {
    last_error = std::string("invalid configuration argument (") + kernel + ": grid " +
                 std::to_string(grid.x) + "x" + std::to_string(grid.y) + "x" + std::to_string(grid.z) +
                 ", block " + std::to_string(block.x) + "x" + std::to_string(block.y) + "x" +
                 std::to_string(block.z) + ")";
    return;
  }
  if (shared_bytes > kMaxDynamicSharedBytes) {
    last_error = std::string("too much dynamic shared memory requested (") + kernel + ": " +
                 std::to_string(shared_bytes) + " bytes > 48 KiB)";
    return;
  }
  if (options().record_launches) {
    std::lock_guard<std::mutex> lock(log_mutex);
    if (log.size() >= kMaxLogged) log.erase(log.begin(), log.begin() + kMaxLogged / 2);
    log.push_back({kernel, grid, block, shared_bytes});
  }
  std::lock_guard<std::mutex> lock(launch_mutex());
  Block b;
  b.body = &thread_body;
  b.grid = grid;
  b.block = block;
  // Blocks run in reverse order: a kernel must not depend on the order of its blocks.
  for (std::uint64_t linear = blocks; linear-- > 0;) {
    b.index = dim3(static_cast<unsigned int>(linear % grid.x),
                   static_cast<unsigned int>((linear / grid.x) % grid.y),
                   static_cast<unsigned int>(linear / (static_cast<std::uint64_t>(grid.x) * grid.y)));
    std::unique_ptr<unsigned char[], SharedDeleter> shared;
    if (shared_bytes > 0) {
      shared.reset(static_cast<unsigned char*>(::operator new[](shared_bytes, std::align_val_t(16))));
      std::fill(shared.get(), shared.get() + shared_bytes, kSharedPoison);
    }
    b.shared = shared.get();
    pool().run(b, static_cast<int>(threads));
  }
}

}  // namespace emu
}  // namespace resattn

void __syncthreads() {
  resattn::emu::Block* block = resattn::emu::current_block;
  TORCH_CHECK(block != nullptr, "resattn_fast emulation: __syncthreads() outside a kernel");
  block->barrier.arrive_and_wait();
}
