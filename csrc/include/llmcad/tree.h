// Token-tree planning: everything derived from a tree's parent array.
// A tree of n nodes is given in creation order: parents[0] == -1, 0 <= parents[i] < i for i > 0.
// Node 0 is the root (the last committed token). Keys are [prefix cached tokens] + [n tree nodes].
// Framework-agnostic: raw pointers and explicit sizes; errors throw std::invalid_argument.
#pragma once
#include <cstdint>
#include <vector>

namespace llmcad {

enum class MaskDType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Throws std::invalid_argument naming the first violation (n == 0, parents[0] != -1, parents[i] >= i, ...).
void validate_tree(const int32_t* parents, int64_t n);

// depths[n]: root has depth 0.
void tree_depths(const int32_t* parents, int64_t n, int32_t* depths);

// positions[n] = prefix + depth.
void tree_positions(const int32_t* parents, int64_t n, int64_t prefix, int64_t* positions);

// Additive mask [n, prefix + n], row-major: 0 where node i may attend (all prefix keys, its ancestors
// and itself), -inf elsewhere. Element type by dtype (fp32, fp16 bits, bf16 bits).
void tree_mask(const int32_t* parents, int64_t n, int64_t prefix, MaskDType dtype, void* out);

// Acceptance walk, shared by greedy and sampled verification. From the root, at node u with target
// choice t = choice[u]: descend to the first-created child c with tokens[c] == t, else stop.
// Writes the accepted node indices (root first) into accepted[n], the bonus token (choice at the last
// accepted node) into *bonus, and returns the number of accepted nodes (>= 1).
int64_t tree_accept(const int32_t* parents, const int32_t* tokens, const int32_t* choice, int64_t n,
                    int32_t* accepted, int32_t* bonus);

// KV slots to keep after a commit: [0, prefix) then prefix + accepted[j]. out has prefix + num_accepted.
void commit_gather_indices(const int32_t* accepted, int64_t num_accepted, int64_t prefix, int64_t* out);

// fp32 -> IEEE half / bfloat16 bit patterns (round to nearest even), used by tree_mask.
uint16_t float_to_half_bits(float value);
uint16_t float_to_bf16_bits(float value);

}  // namespace llmcad
