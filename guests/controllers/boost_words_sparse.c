/*
 * boost_words_sparse.c - boost_words answering WS_OUTPUT_SPARSE_BIAS: the same
 * argument and the same biases, written once at create as (token, value) pairs.
 */
#define BOOST_SPARSE 1
#include "boost_words.c"
