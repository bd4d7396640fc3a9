// CPU implementation of tree.h. O(n * depth) work per routine; trees are at most a few thousand nodes.
#include <cmath>
#include <cstring>
#include <limits>
#include <stdexcept>
#include <string>
#include <vector>

#include "llmcad/tree.h"

namespace llmcad {

void validate_tree(const int32_t* parents, int64_t n) {
  if (n <= 0) throw std::invalid_argument("tree must have at least one node (the root), got n=" + std::to_string(n));
  if (parents[0] != -1)
    throw std::invalid_argument("parents[0] must be -1 (the root), got " + std::to_string(parents[0]));
  for (int64_t i = 1; i < n; ++i) {
    int32_t p = parents[i];
    if (p == -1) throw std::invalid_argument("second root: parents[" + std::to_string(i) + "] == -1");
    if (p < 0 || p >= i)
      throw std::invalid_argument("parents[" + std::to_string(i) + "] = " + std::to_string(p) +
                                  " must be in [0, " + std::to_string(i) + ") (creation order)");
  }
}

void tree_depths(const int32_t* parents, int64_t n, int32_t* depths) {
  depths[0] = 0;
  for (int64_t i = 1; i < n; ++i) depths[i] = depths[parents[i]] + 1;  // parents[i] < i
}

void tree_positions(const int32_t* parents, int64_t n, int64_t prefix, int64_t* positions) {
  std::vector<int32_t> depths(n);
  tree_depths(parents, n, depths.data());
  for (int64_t i = 0; i < n; ++i) positions[i] = prefix + depths[i];
}

uint16_t float_to_half_bits(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  uint32_t sign = (x >> 16) & 0x8000u;
  uint32_t exp = (x >> 23) & 0xffu;
  uint32_t mant = x & 0x7fffffu;
  if (exp == 0xffu) return static_cast<uint16_t>(sign | 0x7c00u | (mant ? 0x200u : 0u));  // inf / nan
  int32_t e = static_cast<int32_t>(exp) - 127 + 15;
  if (e >= 31) return static_cast<uint16_t>(sign | 0x7c00u);  // overflow -> inf
  if (e <= 0) {                                               // subnormal or zero
    if (e < -10) return static_cast<uint16_t>(sign);
    mant |= 0x800000u;
    uint32_t shift = static_cast<uint32_t>(14 - e);
    uint32_t half = mant >> shift;
    uint32_t rem = mant & ((1u << shift) - 1u);
    uint32_t mid = 1u << (shift - 1);
    if (rem > mid || (rem == mid && (half & 1u))) ++half;
    return static_cast<uint16_t>(sign | half);
  }
  uint32_t half = sign | (static_cast<uint32_t>(e) << 10) | (mant >> 13);
  uint32_t rem = mant & 0x1fffu;
  if (rem > 0x1000u || (rem == 0x1000u && (half & 1u))) ++half;  // may carry into exponent: correct
  return static_cast<uint16_t>(half);
}

uint16_t float_to_bf16_bits(float value) {
  uint32_t x;
  std::memcpy(&x, &value, 4);
  if ((x & 0x7f800000u) == 0x7f800000u && (x & 0x7fffffu)) return static_cast<uint16_t>((x >> 16) | 0x40u);
  x += 0x7fffu + ((x >> 16) & 1u);  // round to nearest even
  return static_cast<uint16_t>(x >> 16);
}

namespace {
// Row i's visible tree keys: the ancestors of i and i itself. Marks them in `row` (size n).
void mark_ancestors(const int32_t* parents, int64_t i, std::vector<char>& row) {
  for (int64_t a = i; a >= 0; a = parents[a]) row[a] = 1;
}

template <typename T>
void fill_mask(const int32_t* parents, int64_t n, int64_t prefix, T zero, T neg_inf, T* out) {
  int64_t cols = prefix + n;
  std::vector<char> row(n);
  for (int64_t i = 0; i < n; ++i) {
    T* dst = out + i * cols;
    for (int64_t k = 0; k < prefix; ++k) dst[k] = zero;
    std::fill(row.begin(), row.end(), 0);
    mark_ancestors(parents, i, row);
    for (int64_t j = 0; j < n; ++j) dst[prefix + j] = row[j] ? zero : neg_inf;
  }
}
}  // namespace

void tree_mask(const int32_t* parents, int64_t n, int64_t prefix, MaskDType dtype, void* out) {
  const float inf = std::numeric_limits<float>::infinity();
  switch (dtype) {
    case MaskDType::F32:
      fill_mask<float>(parents, n, prefix, 0.0f, -inf, static_cast<float*>(out));
      break;
    case MaskDType::F16:
      fill_mask<uint16_t>(parents, n, prefix, 0, float_to_half_bits(-inf), static_cast<uint16_t*>(out));
      break;
    case MaskDType::BF16:
      fill_mask<uint16_t>(parents, n, prefix, 0, float_to_bf16_bits(-inf), static_cast<uint16_t*>(out));
      break;
    default:
      throw std::invalid_argument("unknown mask dtype code " + std::to_string(static_cast<int>(dtype)));
  }
}

int64_t tree_accept(const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n,
                    int32_t* accepted, int32_t* bonus) {
  int64_t count = 0;
  int64_t node = 0;
  accepted[count++] = 0;
  for (;;) {
    int64_t next = -1;
    for (int64_t c = node + 1; c < n; ++c) {  // children come after their parent
      if (parents[c] == node && tokens[c] == choice[node]) {
        next = c;
        break;
      }
    }
    if (next < 0) break;
    accepted[count++] = static_cast<int32_t>(next);
    node = next;
  }
  *bonus = choice[node];
  return count;
}

void commit_gather_indices(const int32_t* accepted, int64_t num_accepted, int64_t prefix, int64_t* out) {
  for (int64_t k = 0; k < prefix; ++k) out[k] = k;
  for (int64_t j = 0; j < num_accepted; ++j) out[prefix + j] = prefix + accepted[j];
}

}  // namespace llmcad
