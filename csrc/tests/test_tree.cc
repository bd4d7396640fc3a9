// C++ unit tests of tree.h: hand-worked trees and metamorphic cases.
#include <gtest/gtest.h>

#include <cmath>
#include <stdexcept>
#include <vector>

#include "llmcad/tree.h"

using llmcad::MaskDType;

namespace {
std::vector<int32_t> chain(int n) {
  std::vector<int32_t> p(n);
  for (int i = 0; i < n; ++i) p[i] = i - 1;
  return p;
}
std::vector<int32_t> star(int n) {
  std::vector<int32_t> p(n, 0);
  p[0] = -1;
  return p;
}
}  // namespace

TEST(Tree, DepthsAndPositions) {
  std::vector<int32_t> parents{-1, 0, 0, 1, 3, 2};
  std::vector<int32_t> depths(6);
  llmcad::tree_depths(parents.data(), 6, depths.data());
  EXPECT_EQ(depths, (std::vector<int32_t>{0, 1, 1, 2, 3, 2}));
  std::vector<int64_t> pos(6);
  llmcad::tree_positions(parents.data(), 6, 10, pos.data());
  EXPECT_EQ(pos, (std::vector<int64_t>{10, 11, 11, 12, 13, 12}));
}

TEST(Tree, ChainMaskIsLowerTriangular) {
  for (int n : {1, 2, 7, 63, 64, 65, 257}) {
    auto p = chain(n);
    std::vector<float> mask(static_cast<size_t>(n) * n);
    llmcad::tree_mask(p.data(), n, 0, MaskDType::F32, mask.data());
    for (int i = 0; i < n; ++i)
      for (int j = 0; j < n; ++j) EXPECT_EQ(mask[i * n + j] == 0.0f, j <= i);
  }
}

TEST(Tree, StarMaskIsIdentityPlusRootColumn) {
  for (int n : {1, 2, 7, 65}) {
    auto p = star(n);
    int prefix = 3, cols = prefix + n;
    std::vector<float> mask(static_cast<size_t>(n) * cols);
    llmcad::tree_mask(p.data(), n, prefix, MaskDType::F32, mask.data());
    for (int i = 0; i < n; ++i)
      for (int k = 0; k < cols; ++k) {
        int j = k - prefix;
        bool visible = j < 0 || j == 0 || j == i;
        EXPECT_EQ(mask[i * cols + k] == 0.0f, visible);
        if (!visible) EXPECT_TRUE(std::isinf(mask[i * cols + k]) && mask[i * cols + k] < 0);
      }
  }
}

TEST(Tree, HalfAndBf16MasksUseNegativeInfinityBits) {
  std::vector<int32_t> p{-1, 0};
  std::vector<uint16_t> h(4), b(4);
  llmcad::tree_mask(p.data(), 2, 0, MaskDType::F16, h.data());
  llmcad::tree_mask(p.data(), 2, 0, MaskDType::BF16, b.data());
  EXPECT_EQ(h, (std::vector<uint16_t>{0, 0xfc00, 0, 0}));
  EXPECT_EQ(b, (std::vector<uint16_t>{0, 0xff80, 0, 0}));
  EXPECT_EQ(llmcad::float_to_half_bits(1.0f), 0x3c00);
  EXPECT_EQ(llmcad::float_to_bf16_bits(1.0f), 0x3f80);
}

TEST(Tree, AcceptWalkAndCommitIndices) {
  std::vector<int32_t> p{-1, 0, 0, 1, 2};
  std::vector<int32_t> tokens{5, 10, 11, 12, 13};
  std::vector<int32_t> choice{11, 99, 13, 98, 42};
  std::vector<int32_t> accepted(5);
  int32_t bonus = -1;
  int64_t count = llmcad::tree_accept(p.data(), tokens.data(), choice.data(), 5, accepted.data(), &bonus);
  ASSERT_EQ(count, 3);
  EXPECT_EQ(accepted[1], 2);
  EXPECT_EQ(accepted[2], 4);
  EXPECT_EQ(bonus, 42);
  std::vector<int64_t> gather(7);
  llmcad::commit_gather_indices(accepted.data(), count, 4, gather.data());
  EXPECT_EQ(gather, (std::vector<int64_t>{0, 1, 2, 3, 4, 6, 8}));
}

TEST(Tree, ValidationNamesTheProblem) {
  std::vector<int32_t> bad_root{0, 0};
  std::vector<int32_t> forward{-1, 1};
  std::vector<int32_t> two_roots{-1, 0, -1};
  EXPECT_THROW(llmcad::validate_tree(bad_root.data(), 2), std::invalid_argument);
  EXPECT_THROW(llmcad::validate_tree(forward.data(), 2), std::invalid_argument);
  EXPECT_THROW(llmcad::validate_tree(two_roots.data(), 3), std::invalid_argument);
  EXPECT_THROW(llmcad::validate_tree(forward.data(), 0), std::invalid_argument);
  EXPECT_NO_THROW(llmcad::validate_tree(chain(9).data(), 9));
}
