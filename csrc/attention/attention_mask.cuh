// attention_mask.cuh — which keys a query sees, and where a sequence's rows are: the
// arithmetic every attention kernel shares (attention_contract.py defines it).
//
// Within a sequence of len_q queries and len_k keys, query i sits at key position
// p = i + len_k - len_q (bottom-right alignment) and sees the keys j with
// p - window_left <= j <= p + window_right and 0 <= j < len_k. Causal is window_right = 0.
// All of it fits in int32 with kAttentionUnbounded = 2**30 and lengths < 2**31... except
// the sums, which are done in int64 here.
#pragma once

#include <cstdint>

#include "attention.h"

namespace fusedops {

struct SequenceRows {
  int64_t begin;  // first row of the sequence in the (packed or per-batch) row space
  int64_t length; // rows, clamped so that [begin, begin + length) lies inside [0, total)
};

// The rows of sequence b of a packed tensor of `total` rows (cu_seqlens is not trusted:
// every value is clamped to [0, total] and the end to >= begin), or of a batched one.
__host__ __device__ __forceinline__ SequenceRows clamp_sequence(const int32_t* cu_seqlens,
                                                                int b, int64_t total,
                                                                int64_t batched_length) {
  if (cu_seqlens == nullptr) return {0, batched_length};
  int64_t begin = cu_seqlens[b];
  int64_t end = cu_seqlens[b + 1];
  begin = begin < 0 ? 0 : (begin > total ? total : begin);
  end = end < begin ? begin : (end > total ? total : end);
  return {begin, end - begin};
}

// Keys [first, last] (inclusive; empty when last < first) that query rows [row_begin,
// row_end) of a sequence see, together: the union of their windows, clipped to the keys.
struct KeyRange {
  int64_t first, last;
};

__host__ __device__ __forceinline__ KeyRange visible_keys(int64_t row_begin, int64_t row_end,
                                                          int64_t len_q, int64_t len_k,
                                                          int window_left, int window_right) {
  const int64_t offset = len_k - len_q;
  const int64_t last_row = (row_end < len_q ? row_end : len_q) - 1;
  int64_t first = row_begin + offset - window_left;
  int64_t last = last_row + offset + window_right;
  first = first < 0 ? 0 : first;
  last = last > len_k - 1 ? len_k - 1 : last;
  return {first, last};
}

// Keys [first, last] that EVERY row of [row_begin, row_end) sees (a block of keys inside it
// needs no mask): the intersection of their windows, clipped.
__host__ __device__ __forceinline__ KeyRange keys_seen_by_all(int64_t row_begin,
                                                              int64_t row_end, int64_t len_q,
                                                              int64_t len_k, int window_left,
                                                              int window_right) {
  const int64_t offset = len_k - len_q;
  const int64_t last_row = (row_end < len_q ? row_end : len_q) - 1;
  int64_t first = last_row + offset - window_left;
  int64_t last = row_begin + offset + window_right;
  first = first < 0 ? 0 : first;
  last = last > len_k - 1 ? len_k - 1 : last;
  return {first, last};
}

// Query rows [first, last] that see at least one key of [key_begin, key_end) (for the
// backward's key-block-major loops).
__host__ __device__ __forceinline__ KeyRange rows_seeing_keys(int64_t key_begin,
                                                              int64_t key_end, int64_t len_q,
                                                              int64_t len_k, int window_left,
                                                              int window_right) {
  const int64_t offset = len_k - len_q;
  const int64_t last_key = (key_end < len_k ? key_end : len_k) - 1;
  // Row i sees key j iff i + offset - left <= j <= i + offset + right.
  int64_t first = key_begin - offset - window_right;
  int64_t last = last_key - offset + window_left;
  first = first < 0 ? 0 : first;
  last = last > len_q - 1 ? len_q - 1 : last;
  return {first, last};
}

// Whether query i sees key j (both inside the sequence).
__host__ __device__ __forceinline__ bool key_visible(int64_t i, int64_t j, int64_t len_q,
                                                     int64_t len_k, int window_left,
                                                     int window_right) {
  const int64_t p = i + len_k - len_q;
  return j >= 0 && j < len_k && j >= p - window_left && j <= p + window_right;
}

// The lse / delta index of (sequence b, query head h, row s).
__host__ __device__ __forceinline__ int64_t lse_index(const AttentionProblem& p, int b, int h,
                                                      int64_t sequence_begin, int64_t s) {
  if (p.cu_seqlens_q != nullptr) return static_cast<int64_t>(h) * p.total_q + sequence_begin + s;
  return (static_cast<int64_t>(b) * p.heads_q + h) * p.seqlen_q + s;
}

}  // namespace fusedops
