// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * pfcore.c - native core of the pagefusion fusion worker
 *
 * See pfcore.h for the design: what is read, how pages are fingerprinted
 * and classified, and how much memory it costs.
 */
#define _GNU_SOURCE
#include "pfcore.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#if defined(__SSE2__)
#include <emmintrin.h>
#define PF_HASH_SSE2 1
#elif defined(__ARM_NEON) && defined(__BYTE_ORDER__) && \
	__BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
#include <arm_neon.h>
#define PF_HASH_NEON 1
#endif

#define PF_LANES		8
#define PF_WORD_BYTES		8
#define PF_STRIPE_BYTES		(PF_LANES * PF_WORD_BYTES)
#define PF_STRIPES		(PF_PAGE_SIZE / PF_STRIPE_BYTES)

/* Odd constants from the fractional parts of sqrt(3) and sqrt(7). */
#define PF_MIX_MUL_A		0xbb67ae8584caa73bULL
#define PF_MIX_MUL_B		0xa54ff53a5f1d36f1ULL
/* 2^64 / golden ratio: spaces the key schedule's counter inputs. */
#define PF_SCHEDULE_GAMMA	0x9e3779b97f4a7c15ULL

/* Word indices of the key schedule. */
enum {
	SCHEDULE_LANE_MASK	= 0,
	SCHEDULE_LANE_STEP	= 8,
	SCHEDULE_FOLD_PROD	= 16,
	SCHEDULE_FOLD_SUM	= 24,
	SCHEDULE_FINAL_SEED	= 32,
	SCHEDULE_KEY_ID		= 33,
};

struct pf_hash_key {
	uint64_t lane_mask[PF_LANES];
	uint64_t lane_step[PF_LANES];
	uint64_t fold_prod[PF_LANES];
	uint64_t fold_sum[PF_LANES];
	uint64_t final_seed;
	uint64_t key_id;
};

/*
 * page_flags bits: stable, and the class of the last look, kept so that a
 * page KSM shares can be counted without reading it again.
 */
#define PAGE_STABLE		0x01
#define PAGE_CLASS_MASK		0x0e
#define PAGE_CLASS_VOLATILE	0x02
#define PAGE_CLASS_ZERO		0x04
#define PAGE_CLASS_DUPLICATE	0x06
#define PAGE_CLASS_UNIQUE	0x08
#define PAGE_FOREIGN		0x10
#define PAGE_FUSIBLE		0x20

/* /proc/PID/pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst) */
#define PM_PRESENT		(1ULL << 63)
#define PM_MMAP_EXCLUSIVE	(1ULL << 56)

/*
 * A page waiting for byte confirmation against a candidate copy: the
 * candidate is a page of this process (source 0) or of foreign set
 * source - 1.
 */
struct pf_candidate {
	uint32_t batch_slot;
	uint32_t source;
	uint64_t page;
};

struct pf_foreign_set {
	int pid;
	bool unreadable;	/* the last read failed: drop after the batch */
	uint32_t nr_entries;
	uint64_t *fps;		/* ascending */
	uint32_t *pages;
	uint32_t *bucket_start;	/* nr_buckets + 1 offsets into fps */
	unsigned int bucket_shift;
	size_t nr_regions;
	struct pf_region *regions;
	uint64_t *region_first_page;	/* nr_regions + 1 */
	size_t bytes;
};

struct pf_scanner {
	int pid;
	struct pf_hash_key key;
	uint64_t pages_per_pass;
	uint64_t passes_done;		/* drives the sampling rotation */

	/* Guest layout: regions in address order, one page index space. */
	size_t nr_regions;
	struct pf_region *regions;
	uint64_t *region_first_page;	/* nr_regions + 1 */
	uint64_t nr_pages;

	/* Last observation of each page. */
	uint64_t *page_fp;
	uint8_t *page_flags;

	/*
	 * Fingerprint index: slot_page holds page + 1 of a representative (0
	 * is empty), the fingerprint is page_fp[page], slot_tag caches a few
	 * fingerprint bits so probes rarely touch page_fp.
	 */
	uint64_t nr_slots;
	uint32_t *slot_page;
	uint8_t *slot_tag;

	/* Current batch. */
	size_t batch_len;
	uint64_t batch_first_page;	/* lowest page index in the batch */
	uint64_t pass_phase;
	uint64_t pass_stride;
	uint64_t run_pages;
	unsigned char *batch_buf;
	unsigned char *confirm_buf;
	uint64_t batch_page[PF_BATCH_PAGES];
	uint64_t batch_addr[PF_BATCH_PAGES];
	uint8_t batch_ok[PF_BATCH_PAGES];
	size_t nr_candidates;
	struct pf_candidate candidates[PF_BATCH_PAGES];
	uint64_t confirm_addr[PF_BATCH_PAGES];
	uint8_t confirm_ok[PF_BATCH_PAGES];

	size_t nr_foreign;
	struct pf_foreign_set *foreign[PF_MAX_FOREIGN_SETS];

	/* This pass's pagemap (-1: read every page) and a window of it. */
	int pagemap_fd;
	uint64_t pagemap_first;		/* page index of pagemap_buf[0] */
	uint64_t pagemap_len;
	uint64_t pagemap_buf[PF_PAGEMAP_CHUNK];
};

/* ------------------------------------------------------------------ */
/* Fingerprint                                                        */

static inline uint64_t load_le64(const unsigned char *p)
{
	uint64_t v;

	memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	return v;
}

static inline uint32_t load_le32(const unsigned char *p)
{
	uint32_t v;

	memcpy(&v, p, sizeof(v));
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap32(v);
#endif
	return v;
}

static inline uint16_t load_le16(const unsigned char *p)
{
	return (uint16_t)(p[0] | p[1] << 8);
}

static inline void store_le64(unsigned char *p, uint64_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap64(v);
#endif
	memcpy(p, &v, sizeof(v));
}

static inline void store_le32(unsigned char *p, uint32_t v)
{
#if defined(__BYTE_ORDER__) && __BYTE_ORDER__ == __ORDER_BIG_ENDIAN__
	v = __builtin_bswap32(v);
#endif
	memcpy(p, &v, sizeof(v));
}

static inline void store_le16(unsigned char *p, uint16_t v)
{
	p[0] = (unsigned char)v;
	p[1] = (unsigned char)(v >> 8);
}

/* Bijective avalanche: every input bit reaches every output bit. */
static inline uint64_t mix64(uint64_t z)
{
	z ^= z >> 32;
	z *= PF_MIX_MUL_A;
	z ^= z >> 29;
	z *= PF_MIX_MUL_B;
	z ^= z >> 32;
	return z;
}

/* Compress two words with one full multiply; both halves keep entropy. */
static inline uint64_t fold128(uint64_t a, uint64_t b)
{
	unsigned __int128 product = (unsigned __int128)a * b;

	return (uint64_t)product ^ (uint64_t)(product >> 64);
}

/* Word j of the key schedule: both key halves reach every bit of it. */
static uint64_t schedule_word(uint64_t k0, uint64_t k1, unsigned int j)
{
	return mix64(k0 ^ mix64(k1 + (j + 1) * PF_SCHEDULE_GAMMA));
}

static void hash_key_expand(struct pf_hash_key *hk, const uint8_t *key)
{
	uint64_t k0 = load_le64(key), k1 = load_le64(key + 8);
	unsigned int lane;

	for (lane = 0; lane < PF_LANES; lane++) {
		hk->lane_mask[lane] =
			schedule_word(k0, k1, SCHEDULE_LANE_MASK + lane);
		hk->lane_step[lane] =
			schedule_word(k0, k1, SCHEDULE_LANE_STEP + lane);
		hk->fold_prod[lane] =
			schedule_word(k0, k1, SCHEDULE_FOLD_PROD + lane);
		hk->fold_sum[lane] =
			schedule_word(k0, k1, SCHEDULE_FOLD_SUM + lane);
	}
	hk->final_seed = schedule_word(k0, k1, SCHEDULE_FINAL_SEED);
	hk->key_id = schedule_word(k0, k1, SCHEDULE_KEY_ID);
}

/*
 * The lane loop, three ways with identical results.  The SIMD versions
 * exist because compilers do not see that the operands of the 64-bit
 * multiply have zero high halves and emit a full 64x64 emulation instead
 * of one pmuludq/umlal per two lanes.
 */
#if defined(PF_HASH_SSE2)
static inline __m128i load_pair(const void *p)
{
	return _mm_loadu_si128((const __m128i *)p);
}

/* acc + low32(v) * high32(v) in both 64-bit lanes (one pmuludq). */
static inline __m128i add_half_product(__m128i acc, __m128i v)
{
	return _mm_add_epi64(acc, _mm_mul_epu32(v, _mm_srli_epi64(v, 32)));
}

static void hash_lanes(const struct pf_hash_key *hk, const unsigned char *page,
		       uint64_t *prod_out, uint64_t *sum_out)
{
	__m128i prod0 = _mm_setzero_si128(), prod1 = prod0;
	__m128i prod2 = prod0, prod3 = prod0;
	__m128i sum0 = prod0, sum1 = prod0, sum2 = prod0, sum3 = prod0;
	__m128i mask0 = load_pair(&hk->lane_mask[0]);
	__m128i mask1 = load_pair(&hk->lane_mask[2]);
	__m128i mask2 = load_pair(&hk->lane_mask[4]);
	__m128i mask3 = load_pair(&hk->lane_mask[6]);
	const __m128i step0 = load_pair(&hk->lane_step[0]);
	const __m128i step1 = load_pair(&hk->lane_step[2]);
	const __m128i step2 = load_pair(&hk->lane_step[4]);
	const __m128i step3 = load_pair(&hk->lane_step[6]);
	const unsigned char *stripe, *end = page + PF_PAGE_SIZE;

	/* Four registers of two lanes each: the 8 lanes of one stripe. */
	for (stripe = page; stripe < end; stripe += PF_STRIPE_BYTES) {
		__m128i w0 = load_pair(stripe);
		__m128i w1 = load_pair(stripe + 16);
		__m128i w2 = load_pair(stripe + 32);
		__m128i w3 = load_pair(stripe + 48);

		prod0 = add_half_product(prod0, _mm_xor_si128(w0, mask0));
		prod1 = add_half_product(prod1, _mm_xor_si128(w1, mask1));
		prod2 = add_half_product(prod2, _mm_xor_si128(w2, mask2));
		prod3 = add_half_product(prod3, _mm_xor_si128(w3, mask3));
		sum0 = _mm_add_epi64(sum0, w0);
		sum1 = _mm_add_epi64(sum1, w1);
		sum2 = _mm_add_epi64(sum2, w2);
		sum3 = _mm_add_epi64(sum3, w3);
		mask0 = _mm_add_epi64(mask0, step0);
		mask1 = _mm_add_epi64(mask1, step1);
		mask2 = _mm_add_epi64(mask2, step2);
		mask3 = _mm_add_epi64(mask3, step3);
	}
	_mm_storeu_si128((__m128i *)&prod_out[0], prod0);
	_mm_storeu_si128((__m128i *)&prod_out[2], prod1);
	_mm_storeu_si128((__m128i *)&prod_out[4], prod2);
	_mm_storeu_si128((__m128i *)&prod_out[6], prod3);
	_mm_storeu_si128((__m128i *)&sum_out[0], sum0);
	_mm_storeu_si128((__m128i *)&sum_out[2], sum1);
	_mm_storeu_si128((__m128i *)&sum_out[4], sum2);
	_mm_storeu_si128((__m128i *)&sum_out[6], sum3);
}
#elif defined(PF_HASH_NEON)
static inline uint64x2_t load_pair(const unsigned char *p)
{
	return vreinterpretq_u64_u8(vld1q_u8(p));
}

/* acc + low32(v) * high32(v) in both 64-bit lanes (one umlal). */
static inline uint64x2_t add_half_product(uint64x2_t acc, uint64x2_t v)
{
	return vmlal_u32(acc, vmovn_u64(v), vshrn_n_u64(v, 32));
}

static void hash_lanes(const struct pf_hash_key *hk, const unsigned char *page,
		       uint64_t *prod_out, uint64_t *sum_out)
{
	uint64x2_t prod0 = vdupq_n_u64(0), prod1 = prod0;
	uint64x2_t prod2 = prod0, prod3 = prod0;
	uint64x2_t sum0 = prod0, sum1 = prod0, sum2 = prod0, sum3 = prod0;
	uint64x2_t mask0 = vld1q_u64(&hk->lane_mask[0]);
	uint64x2_t mask1 = vld1q_u64(&hk->lane_mask[2]);
	uint64x2_t mask2 = vld1q_u64(&hk->lane_mask[4]);
	uint64x2_t mask3 = vld1q_u64(&hk->lane_mask[6]);
	const uint64x2_t step0 = vld1q_u64(&hk->lane_step[0]);
	const uint64x2_t step1 = vld1q_u64(&hk->lane_step[2]);
	const uint64x2_t step2 = vld1q_u64(&hk->lane_step[4]);
	const uint64x2_t step3 = vld1q_u64(&hk->lane_step[6]);
	const unsigned char *stripe, *end = page + PF_PAGE_SIZE;

	for (stripe = page; stripe < end; stripe += PF_STRIPE_BYTES) {
		uint64x2_t w0 = load_pair(stripe);
		uint64x2_t w1 = load_pair(stripe + 16);
		uint64x2_t w2 = load_pair(stripe + 32);
		uint64x2_t w3 = load_pair(stripe + 48);

		prod0 = add_half_product(prod0, veorq_u64(w0, mask0));
		prod1 = add_half_product(prod1, veorq_u64(w1, mask1));
		prod2 = add_half_product(prod2, veorq_u64(w2, mask2));
		prod3 = add_half_product(prod3, veorq_u64(w3, mask3));
		sum0 = vaddq_u64(sum0, w0);
		sum1 = vaddq_u64(sum1, w1);
		sum2 = vaddq_u64(sum2, w2);
		sum3 = vaddq_u64(sum3, w3);
		mask0 = vaddq_u64(mask0, step0);
		mask1 = vaddq_u64(mask1, step1);
		mask2 = vaddq_u64(mask2, step2);
		mask3 = vaddq_u64(mask3, step3);
	}
	vst1q_u64(&prod_out[0], prod0);
	vst1q_u64(&prod_out[2], prod1);
	vst1q_u64(&prod_out[4], prod2);
	vst1q_u64(&prod_out[6], prod3);
	vst1q_u64(&sum_out[0], sum0);
	vst1q_u64(&sum_out[2], sum1);
	vst1q_u64(&sum_out[4], sum2);
	vst1q_u64(&sum_out[6], sum3);
}
#else
static void hash_lanes(const struct pf_hash_key *hk, const unsigned char *page,
		       uint64_t *prod_out, uint64_t *sum_out)
{
	uint64_t prod[PF_LANES] = { 0 }, sum[PF_LANES] = { 0 };
	uint64_t mask[PF_LANES];
	const unsigned char *stripe, *end = page + PF_PAGE_SIZE;
	int lane;

	memcpy(mask, hk->lane_mask, sizeof(mask));
	for (stripe = page; stripe < end; stripe += PF_STRIPE_BYTES) {
		for (lane = 0; lane < PF_LANES; lane++) {
			uint64_t w = load_le64(stripe + PF_WORD_BYTES * lane);
			uint64_t v = w ^ mask[lane];

			prod[lane] += (uint64_t)(uint32_t)v * (v >> 32);
			sum[lane] += w;
			mask[lane] += hk->lane_step[lane];
		}
	}
	memcpy(prod_out, prod, sizeof(prod));
	memcpy(sum_out, sum, sizeof(sum));
}
#endif

static bool page_is_zero(const unsigned char *page)
{
	const unsigned char *stripe, *end = page + PF_PAGE_SIZE;
	int lane;

	/* Stop at the first non-zero stripe: most pages end on the first. */
	for (stripe = page; stripe < end; stripe += PF_STRIPE_BYTES) {
		uint64_t bits = 0;

		for (lane = 0; lane < PF_LANES; lane++)
			bits |= load_le64(stripe + PF_WORD_BYTES * lane);
		if (bits)
			return false;
	}
	return true;
}

/* Fingerprint of a page already known not to be all zero. */
static uint64_t hash_page(const struct pf_hash_key *hk,
			  const unsigned char *page)
{
	uint64_t prod[PF_LANES], sum[PF_LANES];
	uint64_t fp = hk->final_seed;
	int lane;

	hash_lanes(hk, page, prod, sum);
	for (lane = 0; lane < PF_LANES; lane++)
		fp += fold128(prod[lane] ^ hk->fold_prod[lane],
			      sum[lane] ^ hk->fold_sum[lane]);
	fp = mix64(fp);
	/* Keep the reserved values for zero and never-seen pages. */
	if (fp < PF_FP_FIRST)
		fp += PF_FP_FIRST;
	return fp;
}

static uint64_t fingerprint_page(const struct pf_hash_key *hk,
				 const unsigned char *page)
{
	if (page_is_zero(page))
		return PF_FP_ZERO;
	return hash_page(hk, page);
}

int pf_fingerprint_pages(const uint8_t *key, const void *pages,
			 size_t nr_pages, uint64_t *fps)
{
	const unsigned char *page = pages;
	struct pf_hash_key hk;
	size_t i;

	if (!key || (nr_pages && (!pages || !fps)))
		return -EINVAL;
	hash_key_expand(&hk, key);
	for (i = 0; i < nr_pages; i++, page += PF_PAGE_SIZE)
		fps[i] = fingerprint_page(&hk, page);
	return 0;
}

int pf_page_is_zero(const void *page)
{
	return page && page_is_zero(page);
}

/* ------------------------------------------------------------------ */
/* Reading another process                                            */

/*
 * The kernel caps one transfer near 2 GiB and would report a short count
 * that looks like a fault; stay far below.
 */
#define PF_READ_MAX_PAGES_PER_CALL	65536

static inline uint64_t list_addr(const uint64_t *addrs, uint64_t base,
				 size_t i)
{
	return addrs ? addrs[i] : base + (uint64_t)i * PF_PAGE_SIZE;
}

#define PAGEMAP_PRESENT		(1ULL << 63)
#define PAGEMAP_PFN_MASK	((1ULL << 55) - 1)

size_t pf_count_zero_mappings(const uint64_t *entries, size_t nr_entries,
			      uint64_t zero_pfn, uint64_t huge_zero_pfn,
			      uint64_t nr_huge_zero)
{
	size_t count = 0;

	for (size_t i = 0; i < nr_entries; i++) {
		uint64_t pfn = entries[i] & PAGEMAP_PFN_MASK;

		if (!(entries[i] & PAGEMAP_PRESENT) || !pfn)
			continue;
		/* Unsigned wrap makes one compare test the whole range. */
		if (pfn == zero_pfn || pfn - huge_zero_pfn < nr_huge_zero)
			count++;
	}
	return count;
}

/* Open the memory of process @pid for reading; a negative errno on failure. */
static int open_process_memory(int pid)
{
	char path[32];
	int fd;

	snprintf(path, sizeof(path), "/proc/%d/mem", pid);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd >= 0)
		return fd;
	switch (errno) {
	case ENOENT:
	case ESRCH:
		return -ESRCH;
	case EACCES:
		return -EPERM;
	default:
		return -errno;
	}
}

/*
 * Copy pages, given as a list (addrs) or as a contiguous range from base,
 * into dst in order.  A page that cannot be read is marked in page_ok,
 * zero-filled, and skipped.
 *
 * Reading goes through /proc/PID/mem and not process_vm_readv(): the latter
 * pins the pages it reads (FOLL_PIN), and since Linux 5.19 a read-only pin
 * of an anonymous page that is not exclusive to its process unshares it
 * first, which breaks every KSM merge the reader touches.  /proc/PID/mem
 * takes plain references and leaves merged pages merged.
 */
static ssize_t read_pages(int pid, const uint64_t *addrs, uint64_t base,
			  size_t nr_pages, unsigned char *dst, uint8_t *page_ok,
			  uint64_t *bytes_read)
{
	size_t done = 0, nr_ok = 0;
	ssize_t ret;
	int fd;

	if (pid <= 0 || (nr_pages && !dst))
		return -EINVAL;
	for (size_t i = 0; i < nr_pages; i++)
		if (list_addr(addrs, base, i) % PF_PAGE_SIZE)
			return -EINVAL;
	fd = open_process_memory(pid);
	if (fd < 0)
		return fd;

	while (done < nr_pages) {
		uint64_t addr = list_addr(addrs, base, done);
		size_t pages = 1, full;
		ssize_t got;

		/* Adjacent pages are read in one call. */
		while (done + pages < nr_pages &&
		       pages < PF_READ_MAX_PAGES_PER_CALL &&
		       list_addr(addrs, base, done + pages) ==
			       addr + pages * PF_PAGE_SIZE)
			pages++;

		got = pread(fd, dst + done * PF_PAGE_SIZE,
			    pages * PF_PAGE_SIZE, (off_t)addr);
		if (got < 0) {
			if (errno == EINTR)
				continue;
			if (errno != EIO && errno != EFAULT) {
				ret = -errno;
				goto out_close;
			}
			/* The first page is not readable. */
			got = 0;
		}
		if (got == 0 && kill(pid, 0) < 0 && errno == ESRCH) {
			ret = -ESRCH;
			goto out_close;
		}
		if (bytes_read)
			*bytes_read += (uint64_t)got;

		full = (size_t)got / PF_PAGE_SIZE;
		if (page_ok)
			memset(page_ok + done, 1, full);
		nr_ok += full;
		done += full;
		if (full < pages) {
			/* The kernel stopped at this page: skip it. */
			if (page_ok)
				page_ok[done] = 0;
			memset(dst + done * PF_PAGE_SIZE, 0, PF_PAGE_SIZE);
			done++;
		}
	}
	ret = (ssize_t)nr_ok;
out_close:
	close(fd);
	return ret;
}

ssize_t pf_read_pages(int pid, uint64_t remote_addr, size_t nr_pages,
		      void *dst, uint8_t *page_ok, uint64_t *bytes_read)
{
	if (remote_addr % PF_PAGE_SIZE ||
	    nr_pages > (UINT64_MAX - remote_addr) / PF_PAGE_SIZE)
		return -EINVAL;
	return read_pages(pid, NULL, remote_addr, nr_pages, dst, page_ok,
			  bytes_read);
}

ssize_t pf_read_page_list(int pid, const uint64_t *remote_addrs,
			  size_t nr_pages, void *dst, uint8_t *page_ok,
			  uint64_t *bytes_read)
{
	if (nr_pages && !remote_addrs)
		return -EINVAL;
	return read_pages(pid, remote_addrs, 0, nr_pages, dst, page_ok,
			  bytes_read);
}

/* ------------------------------------------------------------------ */
/* Region layout                                                      */

/* Check a region list; on success *nr_pagesp is the pages in all. */
static int check_regions(const struct pf_region *regions, size_t nr_regions,
			 uint64_t *nr_pagesp)
{
	uint64_t nr_pages = 0, end = 0;
	size_t r;

	if (nr_regions && !regions)
		return -EINVAL;
	for (r = 0; r < nr_regions; r++) {
		const struct pf_region *region = &regions[r];

		if (region->start % PF_PAGE_SIZE || !region->nr_pages)
			return -EINVAL;
		if (region->nr_pages > PF_MAX_GUEST_PAGES)
			return -E2BIG;
		if (region->nr_pages >
		    (UINT64_MAX - region->start) / PF_PAGE_SIZE)
			return -EINVAL;
		if (r && region->start < end)
			return -EINVAL;
		end = region->start + region->nr_pages * PF_PAGE_SIZE;
		nr_pages += region->nr_pages;
		if (nr_pages > PF_MAX_GUEST_PAGES)
			return -E2BIG;
	}
	*nr_pagesp = nr_pages;
	return 0;
}

/* Copy of a region list with its prefix page counts. */
static int copy_regions(const struct pf_region *regions, size_t nr_regions,
			struct pf_region **regionsp, uint64_t **first_pagep)
{
	struct pf_region *copy;
	uint64_t *first_page;
	size_t r;

	copy = malloc((nr_regions ? nr_regions : 1) * sizeof(*copy));
	if (!copy)
		return -ENOMEM;
	first_page = malloc((nr_regions + 1) * sizeof(*first_page));
	if (!first_page)
		goto out_free_copy;

	first_page[0] = 0;
	for (r = 0; r < nr_regions; r++) {
		copy[r] = regions[r];
		first_page[r + 1] = first_page[r] + regions[r].nr_pages;
	}
	*regionsp = copy;
	*first_pagep = first_page;
	return 0;

out_free_copy:
	free(copy);
	return -ENOMEM;
}

/* Address of page index @page; regions are searched by bisection. */
static uint64_t page_address(const struct pf_region *regions,
			     const uint64_t *first_page, size_t nr_regions,
			     uint64_t page)
{
	size_t lo = 0, hi = nr_regions;

	while (hi - lo > 1) {
		size_t mid = lo + (hi - lo) / 2;

		if (first_page[mid] <= page)
			lo = mid;
		else
			hi = mid;
	}
	return regions[lo].start + (page - first_page[lo]) * PF_PAGE_SIZE;
}

/* ------------------------------------------------------------------ */
/* Fingerprint index                                                  */

/* Home slot: monotonic in the fingerprint, which keeps exports cheap. */
static inline uint64_t slot_home(const struct pf_scanner *s, uint64_t fp)
{
	return ((fp >> 32) * s->nr_slots) >> 32;
}

/* Bits below the ones slot_home uses, so a tag match is new information. */
static inline uint8_t slot_tag(uint64_t fp)
{
	return (uint8_t)(fp >> 24);
}

static inline uint64_t next_slot(const struct pf_scanner *s, uint64_t slot)
{
	return slot + 1 == s->nr_slots ? 0 : slot + 1;
}

/*
 * Slot holding @fp, or the empty slot where it would go.  The table is
 * never full: it has more slots than the guest has pages, and every entry
 * names a different page whose current fingerprint is the entry's key.
 */
static uint64_t index_probe(const struct pf_scanner *s, uint64_t fp)
{
	uint64_t slot = slot_home(s, fp);
	uint8_t tag = slot_tag(fp);

	for (;;) {
		uint32_t ref = s->slot_page[slot];

		if (!ref)
			return slot;
		if (s->slot_tag[slot] == tag && s->page_fp[ref - 1] == fp)
			return slot;
		slot = next_slot(s, slot);
	}
}

/* Is @x in the cyclic interval (from, to]? */
static inline bool cyclic_within(uint64_t from, uint64_t x, uint64_t to)
{
	if (from <= to)
		return from < x && x <= to;
	return x > from || x <= to;
}

/* Empty @slot and pull later entries back so probes stay unbroken. */
static void index_delete_slot(struct pf_scanner *s, uint64_t slot)
{
	uint64_t hole = slot, next = slot;

	for (;;) {
		uint32_t ref;
		uint64_t home;

		next = next_slot(s, next);
		ref = s->slot_page[next];
		if (!ref)
			break;
		home = slot_home(s, s->page_fp[ref - 1]);
		if (cyclic_within(hole, home, next))
			continue;
		s->slot_page[hole] = ref;
		s->slot_tag[hole] = s->slot_tag[next];
		hole = next;
	}
	s->slot_page[hole] = 0;
}

/* Drop the entry for page_fp[page] if @page is its representative. */
static void index_forget(struct pf_scanner *s, uint64_t page)
{
	uint64_t fp = s->page_fp[page];
	uint64_t slot;

	if (fp < PF_FP_FIRST)
		return;
	slot = index_probe(s, fp);
	if (s->slot_page[slot] == page + 1)
		index_delete_slot(s, slot);
}

/* Make @page the representative of page_fp[page] if there is none. */
static uint64_t index_claim(struct pf_scanner *s, uint64_t page)
{
	uint64_t fp = s->page_fp[page];
	uint64_t slot = index_probe(s, fp);

	if (!s->slot_page[slot]) {
		s->slot_page[slot] = (uint32_t)(page + 1);
		s->slot_tag[slot] = slot_tag(fp);
	}
	return s->slot_page[slot] - 1;
}

/* Make @page the representative of page_fp[page], replacing another. */
static void index_replace(struct pf_scanner *s, uint64_t page)
{
	uint64_t fp = s->page_fp[page];
	uint64_t slot = index_probe(s, fp);

	s->slot_page[slot] = (uint32_t)(page + 1);
	s->slot_tag[slot] = slot_tag(fp);
}

/* 4/3 of the pages, so the load factor stays at or below 3/4. */
static uint64_t index_slots_for(uint64_t nr_pages)
{
	return nr_pages + nr_pages / 3 + 16;
}

/* ------------------------------------------------------------------ */
/* Scanner                                                            */

int pf_scanner_new(int pid, const uint8_t *key, uint64_t pages_per_pass,
		   struct pf_scanner **scannerp)
{
	struct pf_scanner *s;

	if (pid <= 0 || !key || !pages_per_pass || !scannerp)
		return -EINVAL;

	s = calloc(1, sizeof(*s));
	if (!s)
		return -ENOMEM;
	s->pid = pid;
	s->pages_per_pass = pages_per_pass;
	s->pagemap_fd = -1;
	hash_key_expand(&s->key, key);

	s->batch_buf = aligned_alloc(PF_PAGE_SIZE,
				     PF_BATCH_PAGES * PF_PAGE_SIZE);
	if (!s->batch_buf)
		goto out_free_scanner;
	s->confirm_buf = aligned_alloc(PF_PAGE_SIZE,
				       PF_BATCH_PAGES * PF_PAGE_SIZE);
	if (!s->confirm_buf)
		goto out_free_batch_buf;
	if (copy_regions(NULL, 0, &s->regions, &s->region_first_page))
		goto out_free_confirm_buf;

	*scannerp = s;
	return 0;

out_free_confirm_buf:
	free(s->confirm_buf);
out_free_batch_buf:
	free(s->batch_buf);
out_free_scanner:
	free(s);
	return -ENOMEM;
}

static void foreign_free(struct pf_foreign_set *fs)
{
	free(fs->fps);
	free(fs->pages);
	free(fs->bucket_start);
	free(fs->regions);
	free(fs->region_first_page);
	free(fs);
}

void pf_scanner_free(struct pf_scanner *s)
{
	size_t i;

	if (!s)
		return;
	for (i = 0; i < s->nr_foreign; i++)
		foreign_free(s->foreign[i]);
	free(s->slot_tag);
	free(s->slot_page);
	free(s->page_flags);
	free(s->page_fp);
	free(s->region_first_page);
	free(s->regions);
	free(s->confirm_buf);
	free(s->batch_buf);
	free(s);
}

static bool regions_equal(const struct pf_scanner *s,
			  const struct pf_region *regions, size_t nr_regions)
{
	size_t r;

	if (nr_regions != s->nr_regions)
		return false;
	for (r = 0; r < nr_regions; r++)
		if (regions[r].start != s->regions[r].start ||
		    regions[r].nr_pages != s->regions[r].nr_pages)
			return false;
	return true;
}

/*
 * Carry the history of pages mapped in both layouts over to the new page
 * index space.  Both lists are sorted, so one merge-like walk finds every
 * overlap.
 */
static void carry_history(const struct pf_scanner *s,
			  const struct pf_region *regions, size_t nr_regions,
			  const uint64_t *first_page, uint64_t *page_fp,
			  uint8_t *page_flags)
{
	size_t old = 0, new = 0;

	while (old < s->nr_regions && new < nr_regions) {
		const struct pf_region *o = &s->regions[old];
		const struct pf_region *n = &regions[new];
		uint64_t o_end = o->start + o->nr_pages * PF_PAGE_SIZE;
		uint64_t n_end = n->start + n->nr_pages * PF_PAGE_SIZE;
		uint64_t from = o->start > n->start ? o->start : n->start;
		uint64_t to = o_end < n_end ? o_end : n_end;

		if (from < to) {
			uint64_t count = (to - from) / PF_PAGE_SIZE;
			uint64_t src = s->region_first_page[old] +
				       (from - o->start) / PF_PAGE_SIZE;
			uint64_t dst = first_page[new] +
				       (from - n->start) / PF_PAGE_SIZE;

			memcpy(page_fp + dst, s->page_fp + src,
			       count * sizeof(*page_fp));
			memcpy(page_flags + dst, s->page_flags + src, count);
		}
		if (o_end <= n_end)
			old++;
		else
			new++;
	}
}

int pf_scanner_set_regions(struct pf_scanner *s,
			   const struct pf_region *regions, size_t nr_regions)
{
	struct pf_region *new_regions;
	uint64_t *first_page, *page_fp, nr_pages, nr_slots, page, i;
	uint8_t *page_flags, *tags;
	uint32_t *slots;
	int ret;

	if (!s)
		return -EINVAL;
	ret = check_regions(regions, nr_regions, &nr_pages);
	if (ret)
		return ret;
	if (regions_equal(s, regions, nr_regions))
		return 0;

	ret = copy_regions(regions, nr_regions, &new_regions, &first_page);
	if (ret)
		return ret;
	page_fp = malloc((nr_pages ? nr_pages : 1) * sizeof(*page_fp));
	if (!page_fp)
		goto out_free_regions;
	page_flags = calloc(nr_pages ? nr_pages : 1, 1);
	if (!page_flags)
		goto out_free_page_fp;
	nr_slots = index_slots_for(nr_pages);
	slots = calloc(nr_slots, sizeof(*slots));
	if (!slots)
		goto out_free_page_flags;
	tags = malloc(nr_slots);
	if (!tags)
		goto out_free_slots;

	for (i = 0; i < nr_pages; i++)
		page_fp[i] = PF_FP_UNSEEN;
	carry_history(s, regions, nr_regions, first_page, page_fp, page_flags);

	free(s->slot_tag);
	free(s->slot_page);
	free(s->page_flags);
	free(s->page_fp);
	free(s->region_first_page);
	free(s->regions);
	s->regions = new_regions;
	s->region_first_page = first_page;
	s->nr_regions = nr_regions;
	s->nr_pages = nr_pages;
	s->page_fp = page_fp;
	s->page_flags = page_flags;
	s->nr_slots = nr_slots;
	s->slot_page = slots;
	s->slot_tag = tags;

	/* Page references changed: rebuild, first page of a group leads. */
	for (page = 0; page < nr_pages; page++)
		if (page_fp[page] >= PF_FP_FIRST)
			index_claim(s, page);
	return 0;

out_free_slots:
	free(slots);
out_free_page_flags:
	free(page_flags);
out_free_page_fp:
	free(page_fp);
out_free_regions:
	free(first_page);
	free(new_regions);
	return -ENOMEM;
}

/* ------------------------------------------------------------------ */
/* Foreign sets                                                       */

static bool foreign_find(const struct pf_foreign_set *fs, uint64_t fp,
			 uint64_t *page)
{
	uint64_t bucket = fp >> fs->bucket_shift;
	uint32_t k;

	for (k = fs->bucket_start[bucket]; k < fs->bucket_start[bucket + 1];
	     k++) {
		if (fs->fps[k] == fp) {
			*page = fs->pages[k];
			return true;
		}
		if (fs->fps[k] > fp)
			break;
	}
	return false;
}

static ssize_t foreign_find_set(const struct pf_scanner *s, int pid)
{
	size_t i;

	for (i = 0; i < s->nr_foreign; i++)
		if (s->foreign[i]->pid == pid)
			return (ssize_t)i;
	return -1;
}

static void foreign_remove(struct pf_scanner *s, size_t i)
{
	foreign_free(s->foreign[i]);
	memmove(&s->foreign[i], &s->foreign[i + 1],
		(s->nr_foreign - i - 1) * sizeof(s->foreign[0]));
	s->nr_foreign--;
}

/* Parse and check a published set; fills everything but the directory. */
static int foreign_parse(const struct pf_scanner *s, const unsigned char *blob,
			 size_t size, struct pf_foreign_set *fs)
{
	uint64_t nr_regions, nr_entries, nr_pages, listed_pages;
	const unsigned char *region_at, *fp_at, *page_at;
	struct pf_region *regions;
	uint64_t k;
	int ret;

	if (size < PF_EXPORT_HEADER_SIZE)
		return -EINVAL;
	if (load_le32(blob) != PF_EXPORT_MAGIC ||
	    load_le16(blob + 4) != PF_EXPORT_VERSION ||
	    load_le16(blob + 6) != PF_EXPORT_HEADER_SIZE)
		return -EINVAL;
	nr_regions = load_le32(blob + 8);
	nr_entries = load_le32(blob + 12);
	/* 64-bit arithmetic on 32-bit counts cannot overflow here. */
	if (size != PF_EXPORT_HEADER_SIZE +
		    nr_regions * PF_EXPORT_REGION_SIZE +
		    nr_entries * PF_EXPORT_ENTRY_SIZE)
		return -EINVAL;
	if (load_le64(blob + 16) != s->key.key_id)
		return -EKEYREJECTED;
	listed_pages = load_le64(blob + 24);

	regions = malloc((nr_regions ? nr_regions : 1) * sizeof(*regions));
	if (!regions)
		return -ENOMEM;
	region_at = blob + PF_EXPORT_HEADER_SIZE;
	for (k = 0; k < nr_regions; k++) {
		regions[k].start = load_le64(region_at + 16 * k);
		regions[k].nr_pages = load_le64(region_at + 16 * k + 8);
	}
	ret = check_regions(regions, nr_regions, &nr_pages);
	if (!ret && nr_pages != listed_pages)
		ret = -EINVAL;
	if (!ret)
		ret = copy_regions(regions, nr_regions, &fs->regions,
				   &fs->region_first_page);
	free(regions);
	if (ret)
		return ret == -E2BIG ? -EINVAL : ret;
	fs->nr_regions = nr_regions;

	fs->nr_entries = (uint32_t)nr_entries;
	fs->fps = malloc((nr_entries ? nr_entries : 1) * sizeof(*fs->fps));
	fs->pages = malloc((nr_entries ? nr_entries : 1) * sizeof(*fs->pages));
	if (!fs->fps || !fs->pages)
		return -ENOMEM;
	fp_at = region_at + nr_regions * PF_EXPORT_REGION_SIZE;
	page_at = fp_at + nr_entries * 8;
	for (k = 0; k < nr_entries; k++) {
		uint64_t fp = load_le64(fp_at + 8 * k);
		uint32_t page = load_le32(page_at + 4 * k);

		if (fp < PF_FP_FIRST || (k && fp <= fs->fps[k - 1]) ||
		    page >= nr_pages)
			return -EINVAL;
		fs->fps[k] = fp;
		fs->pages[k] = page;
	}
	return 0;
}

/* Bucket directory over the high fingerprint bits: about 4 per bucket. */
static int foreign_index(struct pf_foreign_set *fs)
{
	unsigned int bits = 1;
	uint64_t nr_buckets, bucket = 0;
	uint32_t k;

	while (bits < 32 && (1ULL << (bits + 2)) < fs->nr_entries)
		bits++;
	nr_buckets = 1ULL << bits;
	fs->bucket_shift = 64 - bits;
	fs->bucket_start = malloc((nr_buckets + 1) * sizeof(uint32_t));
	if (!fs->bucket_start)
		return -ENOMEM;
	for (k = 0; k < fs->nr_entries; k++) {
		uint64_t home = fs->fps[k] >> fs->bucket_shift;

		while (bucket <= home)
			fs->bucket_start[bucket++] = k;
	}
	while (bucket <= nr_buckets)
		fs->bucket_start[bucket++] = fs->nr_entries;

	fs->bytes = sizeof(*fs) +
		    fs->nr_entries * (sizeof(uint64_t) + sizeof(uint32_t)) +
		    (nr_buckets + 1) * sizeof(uint32_t) +
		    fs->nr_regions * sizeof(struct pf_region) +
		    (fs->nr_regions + 1) * sizeof(uint64_t);
	return 0;
}

int pf_scanner_load_foreign(struct pf_scanner *s, int pid, const void *blob,
			    size_t blob_size)
{
	struct pf_foreign_set *fs;
	ssize_t existing;
	int ret;

	if (!s || pid <= 0 || pid == s->pid || (blob_size && !blob))
		return -EINVAL;
	existing = foreign_find_set(s, pid);
	if (existing < 0 && s->nr_foreign == PF_MAX_FOREIGN_SETS)
		return -ENOSPC;

	fs = calloc(1, sizeof(*fs));
	if (!fs)
		return -ENOMEM;
	fs->pid = pid;
	ret = foreign_parse(s, blob, blob_size, fs);
	if (ret)
		goto out_free_set;
	ret = foreign_index(fs);
	if (ret)
		goto out_free_set;

	if (existing >= 0) {
		foreign_free(s->foreign[existing]);
		s->foreign[existing] = fs;
	} else {
		s->foreign[s->nr_foreign++] = fs;
	}
	return 0;

out_free_set:
	foreign_free(fs);
	return ret;
}

int pf_scanner_drop_foreign(struct pf_scanner *s, int pid)
{
	ssize_t i;

	if (!s)
		return -EINVAL;
	i = foreign_find_set(s, pid);
	if (i < 0)
		return -ENOENT;
	foreign_remove(s, (size_t)i);
	return 0;
}

size_t pf_scanner_foreign_pids(const struct pf_scanner *s, int *pids,
			       size_t max)
{
	size_t i;

	if (!s)
		return 0;
	for (i = 0; i < s->nr_foreign && i < max && pids; i++)
		pids[i] = s->foreign[i]->pid;
	return s->nr_foreign;
}

size_t pf_scanner_memory_bytes(const struct pf_scanner *s)
{
	size_t bytes, i;

	if (!s)
		return 0;
	bytes = sizeof(*s) + 2 * (size_t)PF_BATCH_PAGES * PF_PAGE_SIZE;
	bytes += s->nr_regions * sizeof(struct pf_region) +
		 (s->nr_regions + 1) * sizeof(uint64_t);
	bytes += s->nr_pages * (sizeof(uint64_t) + sizeof(uint8_t));
	bytes += s->nr_slots * (sizeof(uint32_t) + sizeof(uint8_t));
	for (i = 0; i < s->nr_foreign; i++)
		bytes += s->foreign[i]->bytes;
	return bytes;
}

/* ------------------------------------------------------------------ */
/* One pass                                                           */

static inline unsigned char *batch_page_bytes(const struct pf_scanner *s,
					      size_t slot)
{
	return s->batch_buf + slot * PF_PAGE_SIZE;
}

/* Batch slot of @page if it was read in this batch, else -1. */
static ssize_t batch_slot_of(const struct pf_scanner *s, uint64_t page)
{
	size_t lo = 0, hi = s->batch_len;

	/* A pass visits pages in increasing order, so a batch is sorted. */
	while (lo < hi) {
		size_t mid = lo + (hi - lo) / 2;

		if (s->batch_page[mid] < page)
			lo = mid + 1;
		else
			hi = mid;
	}
	if (lo < s->batch_len && s->batch_page[lo] == page &&
	    s->batch_ok[lo])
		return (ssize_t)lo;
	return -1;
}

/* Was @page scanned earlier in the current pass (before this batch)? */
static bool scanned_this_pass(const struct pf_scanner *s, uint64_t page)
{
	return (page / s->run_pages) % s->pass_stride == s->pass_phase &&
	       page < s->batch_first_page;
}

static void count_duplicate(struct pf_scanner *s, size_t slot,
			    bool copy_stable, bool foreign,
			    struct pf_counters *c)
{
	uint8_t *flags = &s->page_flags[s->batch_page[slot]];

	*flags = (*flags & PAGE_STABLE) | PAGE_CLASS_DUPLICATE;
	c->pages_duplicate++;
	if (foreign) {
		c->pages_foreign++;
		*flags |= PAGE_FOREIGN;
	}
	if (copy_stable && (*flags & PAGE_STABLE)) {
		c->pages_fusible++;
		*flags |= PAGE_FUSIBLE;
	}
}

static void count_unique(struct pf_scanner *s, uint64_t page,
			 struct pf_counters *c)
{
	s->page_flags[page] = (s->page_flags[page] & PAGE_STABLE) |
			      PAGE_CLASS_UNIQUE;
	c->pages_unique++;
}

static int compare_candidates(const void *a, const void *b)
{
	const struct pf_candidate *x = a, *y = b;

	if (x->source != y->source)
		return x->source < y->source ? -1 : 1;
	if (x->page != y->page)
		return x->page < y->page ? -1 : 1;
	if (x->batch_slot != y->batch_slot)
		return x->batch_slot < y->batch_slot ? -1 : 1;
	return 0;
}

/*
 * Read each distinct candidate page of one source once into confirm_buf,
 * in candidate order, skipping own pages already in the batch buffer.
 * A foreign process that can no longer be read leaves its copies marked
 * unread and its set marked for dropping; only this domain's own
 * disappearance is an error.
 */
static int read_candidates(struct pf_scanner *s, struct pf_foreign_set *fs,
			   const struct pf_candidate *cand, size_t nr,
			   struct pf_counters *c)
{
	size_t i, nr_reads = 0;
	ssize_t ret;

	for (i = 0; i < nr; i++) {
		uint64_t page = cand[i].page;

		if (i && page == cand[i - 1].page)
			continue;
		if (fs)
			s->confirm_addr[nr_reads++] =
				page_address(fs->regions, fs->region_first_page,
					     fs->nr_regions, page);
		else if (batch_slot_of(s, page) < 0)
			s->confirm_addr[nr_reads++] =
				page_address(s->regions, s->region_first_page,
					     s->nr_regions, page);
	}
	if (!nr_reads)
		return 0;

	ret = pf_read_page_list(fs ? fs->pid : s->pid, s->confirm_addr,
				nr_reads, s->confirm_buf, s->confirm_ok,
				&c->bytes_read);
	if (ret >= 0)
		return 0;
	if (!fs)
		return (int)ret;
	fs->unreadable = true;
	memset(s->confirm_ok, 0, nr_reads);
	return 0;
}

/*
 * Compare the pages of one group (same source, same candidate page) with
 * the candidate's current bytes (copy, NULL if it could not be read).  A
 * page that differs is unique.  If the candidate merely changed since it
 * was fingerprinted (it no longer hashes to the group's fingerprint), the
 * first such page of this process takes over as representative and the
 * rest of the group is compared with it instead.
 */
static void confirm_group(struct pf_scanner *s, bool foreign,
			  const struct pf_candidate *cand, size_t nr,
			  const unsigned char *copy, bool copy_stable,
			  struct pf_counters *c)
{
	const unsigned char *lead_bytes = NULL;
	bool lead_stable = false;
	size_t i;

	for (i = 0; i < nr; i++) {
		size_t slot = cand[i].batch_slot;
		uint64_t page = s->batch_page[slot];
		const unsigned char *bytes = batch_page_bytes(s, slot);

		if (copy && !memcmp(copy, bytes, PF_PAGE_SIZE)) {
			count_duplicate(s, slot, copy_stable, foreign, c);
			continue;
		}
		if (lead_bytes && !memcmp(lead_bytes, bytes, PF_PAGE_SIZE)) {
			count_duplicate(s, slot, lead_stable, false, c);
			continue;
		}
		count_unique(s, page, c);
		if (copy && hash_page(&s->key, copy) == s->page_fp[page]) {
			/* Same fingerprint, other bytes. */
			c->hash_collisions++;
		} else if (!foreign && !lead_bytes) {
			index_replace(s, page);
			lead_bytes = bytes;
			lead_stable = s->page_flags[page] & PAGE_STABLE;
		}
	}
}

/* Confirm the candidates of one source, sorted by candidate page. */
static int confirm_source(struct pf_scanner *s, struct pf_candidate *cand,
			  size_t nr, struct pf_counters *c)
{
	struct pf_foreign_set *fs = NULL;
	size_t i = 0, end, read_at = 0;
	int ret;

	if (cand[0].source)
		fs = s->foreign[cand[0].source - 1];
	ret = read_candidates(s, fs, cand, nr, c);
	if (ret)
		return ret;

	for (i = 0; i < nr; i = end) {
		uint64_t page = cand[i].page;
		const unsigned char *copy = NULL;
		ssize_t in_batch = fs ? -1 : batch_slot_of(s, page);
		bool copy_stable = true;

		for (end = i; end < nr && cand[end].page == page; end++)
			;
		if (in_batch >= 0) {
			/* Read in this very batch: one look, its own flag. */
			copy = batch_page_bytes(s, (size_t)in_batch);
			copy_stable = s->page_flags[page] & PAGE_STABLE;
		} else {
			if (s->confirm_ok[read_at])
				copy = s->confirm_buf + read_at * PF_PAGE_SIZE;
			read_at++;
			/*
			 * Matching bytes now and a scan in an earlier pass
			 * make two looks a pass apart: stable.
			 */
			if (!fs && !scanned_this_pass(s, page))
				copy_stable = true;
			else if (!fs)
				copy_stable = s->page_flags[page] & PAGE_STABLE;
		}
		confirm_group(s, fs != NULL, &cand[i], end - i, copy,
			      copy_stable, c);
	}
	return 0;
}

static int confirm_candidates(struct pf_scanner *s, struct pf_counters *c)
{
	size_t i = 0, j;
	int ret;

	qsort(s->candidates, s->nr_candidates, sizeof(s->candidates[0]),
	      compare_candidates);
	while (i < s->nr_candidates) {
		for (j = i; j < s->nr_candidates &&
			    s->candidates[j].source == s->candidates[i].source;
		     j++)
			;
		ret = confirm_source(s, &s->candidates[i], j - i, c);
		if (ret)
			return ret;
		i = j;
	}

	/* Drop foreign sets whose process could not be read. */
	for (i = s->nr_foreign; i-- > 0;)
		if (s->foreign[i]->unreadable)
			foreign_remove(s, i);
	return 0;
}

static void queue_candidate(struct pf_scanner *s, size_t slot,
			    uint32_t source, uint64_t page)
{
	struct pf_candidate *cand = &s->candidates[s->nr_candidates++];

	cand->batch_slot = (uint32_t)slot;
	cand->source = source;
	cand->page = page;
}

/*
 * Look the fingerprint up in the foreign sets; queue the first hit.  Only
 * sets of processes with a lower pid count: of a content spread over
 * several domains, the copy of the lowest pid is the one KSM keeps, so
 * summing fusible pages over domains gives exactly the saving.
 */
static bool queue_foreign(struct pf_scanner *s, size_t slot, uint64_t fp)
{
	uint64_t page;
	size_t i;

	for (i = 0; i < s->nr_foreign; i++) {
		if (s->foreign[i]->pid > s->pid)
			continue;
		if (foreign_find(s->foreign[i], fp, &page)) {
			queue_candidate(s, slot, (uint32_t)(i + 1), page);
			return true;
		}
	}
	return false;
}

/* Record the new observation of one page and classify it. */
static void classify_page(struct pf_scanner *s, size_t slot,
			  struct pf_counters *c)
{
	uint64_t page = s->batch_page[slot];
	uint64_t prev = s->page_fp[page];
	uint64_t fp = fingerprint_page(&s->key, batch_page_bytes(s, slot));
	bool seen = prev != PF_FP_UNSEEN;
	bool stable = seen && prev == fp;
	uint64_t lead;

	if (prev != fp) {
		index_forget(s, page);
		s->page_fp[page] = fp;
	}
	s->page_flags[page] = stable ? PAGE_STABLE : 0;
	c->pages_scanned++;

	if (seen && !stable) {
		s->page_flags[page] |= PAGE_CLASS_VOLATILE;
		c->pages_volatile++;
		/* Its new contents may still lead a group later on. */
		if (fp >= PF_FP_FIRST)
			index_claim(s, page);
		return;
	}
	if (fp == PF_FP_ZERO) {
		s->page_flags[page] |= PAGE_CLASS_ZERO;
		c->pages_zero++;
		if (stable) {
			s->page_flags[page] |= PAGE_FUSIBLE;
			c->pages_fusible++;
			c->pages_fusible_zero++;
		}
		return;
	}

	lead = index_claim(s, page);
	if (lead != page)
		queue_candidate(s, slot, 0, lead);
	else if (!queue_foreign(s, slot, fp))
		count_unique(s, page, c);
}

/* Count a page KSM shares in the class of its last look, without reading it. */
static void count_unread_shared(const struct pf_scanner *s, uint64_t page,
				struct pf_counters *c)
{
	uint8_t flags = s->page_flags[page];

	c->pages_scanned++;
	c->pages_unread_shared++;
	switch (flags & PAGE_CLASS_MASK) {
	case PAGE_CLASS_ZERO:
		c->pages_zero++;
		if (flags & PAGE_FUSIBLE) {
			c->pages_fusible++;
			c->pages_fusible_zero++;
		}
		break;
	case PAGE_CLASS_DUPLICATE:
		c->pages_duplicate++;
		if (flags & PAGE_FOREIGN)
			c->pages_foreign++;
		if (flags & PAGE_FUSIBLE)
			c->pages_fusible++;
		break;
	default:
		c->pages_unique++;
		break;
	}
}

/* Fill the pagemap window from @page to at most the end of its region. */
static int pagemap_fill(struct pf_scanner *s, uint64_t page, size_t region)
{
	uint64_t left = s->region_first_page[region + 1] - page;
	uint64_t nr = left < PF_PAGEMAP_CHUNK ? left : PF_PAGEMAP_CHUNK;
	uint64_t addr = s->regions[region].start +
			(page - s->region_first_page[region]) * PF_PAGE_SIZE;
	ssize_t got;

	do {
		got = pread(s->pagemap_fd, s->pagemap_buf,
			    nr * sizeof(uint64_t),
			    (off_t)(addr / PF_PAGE_SIZE * sizeof(uint64_t)));
	} while (got < 0 && errno == EINTR);
	s->pagemap_first = page;
	s->pagemap_len = got > 0 ? (uint64_t)got / sizeof(uint64_t) : 0;
	return s->pagemap_len ? 0 : -EIO;
}

/*
 * May @page be counted from its last look?  Only if that look found it
 * stable and classified it, and it is still mapped shared: see "Pages KSM
 * already shares" in pfcore.h for why its contents cannot have changed.
 */
static bool unchanged_shared(struct pf_scanner *s, uint64_t page,
			     size_t region)
{
	uint8_t flags = s->page_flags[page];
	uint8_t class = flags & PAGE_CLASS_MASK;
	uint64_t entry;

	if (s->pagemap_fd < 0 || !(flags & PAGE_STABLE) ||
	    (class != PAGE_CLASS_ZERO && class != PAGE_CLASS_DUPLICATE &&
	     class != PAGE_CLASS_UNIQUE))
		return false;
	if (page < s->pagemap_first ||
	    page >= s->pagemap_first + s->pagemap_len) {
		if (pagemap_fill(s, page, region))
			return false;
	}
	entry = s->pagemap_buf[page - s->pagemap_first];
	return (entry & PM_PRESENT) && !(entry & PM_MMAP_EXCLUSIVE);
}

/* Open pagemap for a pass that may leave shared pages unread. */
static void pagemap_open(struct pf_scanner *s)
{
	char path[40];
	uint64_t cycle = s->passes_done / s->pass_stride;

	s->pagemap_fd = -1;
	s->pagemap_len = 0;
	if (cycle % PF_FULL_READ_CYCLES == 0)
		return;
	snprintf(path, sizeof(path), "/proc/%d/pagemap", s->pid);
	s->pagemap_fd = open(path, O_RDONLY | O_CLOEXEC);
}

static void pagemap_close(struct pf_scanner *s)
{
	if (s->pagemap_fd >= 0)
		close(s->pagemap_fd);
	s->pagemap_fd = -1;
}

/* A page that could not be read has no known contents any more. */
static void forget_page(struct pf_scanner *s, uint64_t page)
{
	index_forget(s, page);
	s->page_fp[page] = PF_FP_UNSEEN;
	s->page_flags[page] = 0;
}

static int scan_batch(struct pf_scanner *s, struct pf_counters *c)
{
	ssize_t ret;
	size_t slot;

	if (!s->batch_len)
		return 0;
	ret = pf_read_page_list(s->pid, s->batch_addr, s->batch_len,
				s->batch_buf, s->batch_ok, &c->bytes_read);
	if (ret < 0)
		return (int)ret;

	s->nr_candidates = 0;
	for (slot = 0; slot < s->batch_len; slot++) {
		if (!s->batch_ok[slot]) {
			c->read_errors++;
			forget_page(s, s->batch_page[slot]);
			continue;
		}
		classify_page(s, slot, c);
	}
	ret = confirm_candidates(s, c);
	s->batch_len = 0;
	return (int)ret;
}

int pf_scanner_pass(struct pf_scanner *s, struct pf_counters *c)
{
	uint64_t run_pages, runs_per_pass, nr_runs, run, region = 0;
	int ret;

	if (!s || !c)
		return -EINVAL;
	memset(c, 0, sizeof(*c));
	c->pages_total = s->nr_pages;
	if (!s->nr_pages)
		return 0;

	run_pages = s->pages_per_pass < PF_RUN_PAGES ? s->pages_per_pass :
						       PF_RUN_PAGES;
	runs_per_pass = s->pages_per_pass / run_pages;
	nr_runs = (s->nr_pages + run_pages - 1) / run_pages;
	s->run_pages = run_pages;
	/*
	 * Whole runs could leave a few pages over: a budget that covers the
	 * guest always means one pass per cycle.
	 */
	if (s->pages_per_pass >= s->nr_pages)
		s->pass_stride = 1;
	else
		s->pass_stride = (nr_runs + runs_per_pass - 1) / runs_per_pass;
	s->pass_phase = s->passes_done % s->pass_stride;
	c->passes_per_cycle = s->pass_stride;

	s->batch_len = 0;
	pagemap_open(s);
	for (run = s->pass_phase; run < nr_runs; run += s->pass_stride) {
		uint64_t page = run * run_pages;
		uint64_t end = page + run_pages;

		if (end > s->nr_pages)
			end = s->nr_pages;
		for (; page < end; page++) {
			/* Pages only grow in a pass: walk regions forward. */
			while (page >= s->region_first_page[region + 1])
				region++;
			if (unchanged_shared(s, page, region)) {
				count_unread_shared(s, page, c);
				continue;
			}
			if (!s->batch_len)
				s->batch_first_page = page;
			s->batch_page[s->batch_len] = page;
			s->batch_addr[s->batch_len] =
				s->regions[region].start +
				(page - s->region_first_page[region]) *
					PF_PAGE_SIZE;
			if (++s->batch_len == PF_BATCH_PAGES) {
				ret = scan_batch(s, c);
				if (ret)
					goto out_close_pagemap;
			}
		}
	}
	ret = scan_batch(s, c);
	if (!ret)
		s->passes_done++;
out_close_pagemap:
	pagemap_close(s);
	return ret;
}

/* ------------------------------------------------------------------ */
/* Export                                                             */

static inline bool exportable(const struct pf_scanner *s, uint32_t ref)
{
	return ref && (s->page_flags[ref - 1] & PAGE_STABLE);
}

/*
 * Entries come out of the index nearly sorted: home slots grow with the
 * fingerprint and an entry sits at most a cluster away from its home.  The
 * only far-off entries are those that wrapped from the end of the table to
 * its start; they are emitted last.  An insertion sort then finishes in
 * near-linear time without any extra memory.
 */
static void export_entries(const struct pf_scanner *s, unsigned char *fp_at,
			   unsigned char *page_at)
{
	uint64_t first_empty = 0, slot;
	size_t n = 0, k;
	int round;

	while (s->slot_page[first_empty])
		first_empty++;

	for (round = 0; round < 2; round++) {
		for (slot = 0; slot < s->nr_slots; slot++) {
			uint32_t ref = s->slot_page[slot];
			bool wrapped;

			if (!exportable(s, ref))
				continue;
			wrapped = slot < first_empty &&
				  slot_home(s, s->page_fp[ref - 1]) > slot;
			if (wrapped != (round == 1))
				continue;
			store_le64(fp_at + 8 * n, s->page_fp[ref - 1]);
			store_le32(page_at + 4 * n, ref - 1);
			n++;
		}
	}

	for (k = 1; k < n; k++) {
		uint64_t fp = load_le64(fp_at + 8 * k);
		uint32_t page = load_le32(page_at + 4 * k);
		size_t j = k;

		while (j && load_le64(fp_at + 8 * (j - 1)) > fp) {
			memcpy(fp_at + 8 * j, fp_at + 8 * (j - 1), 8);
			memcpy(page_at + 4 * j, page_at + 4 * (j - 1), 4);
			j--;
		}
		store_le64(fp_at + 8 * j, fp);
		store_le32(page_at + 4 * j, page);
	}
}

ssize_t pf_scanner_export(struct pf_scanner *s, void *buf, size_t buf_size)
{
	unsigned char *out = buf, *region_at, *fp_at;
	uint64_t slot, nr_entries = 0;
	size_t size, r;

	if (!s)
		return -EINVAL;
	for (slot = 0; slot < s->nr_slots; slot++)
		if (exportable(s, s->slot_page[slot]))
			nr_entries++;
	size = PF_EXPORT_HEADER_SIZE +
	       s->nr_regions * PF_EXPORT_REGION_SIZE +
	       nr_entries * PF_EXPORT_ENTRY_SIZE;
	if (!buf)
		return (ssize_t)size;
	if (buf_size < size)
		return -ENOSPC;

	store_le32(out, PF_EXPORT_MAGIC);
	store_le16(out + 4, PF_EXPORT_VERSION);
	store_le16(out + 6, PF_EXPORT_HEADER_SIZE);
	store_le32(out + 8, (uint32_t)s->nr_regions);
	store_le32(out + 12, (uint32_t)nr_entries);
	store_le64(out + 16, s->key.key_id);
	store_le64(out + 24, s->nr_pages);
	region_at = out + PF_EXPORT_HEADER_SIZE;
	for (r = 0; r < s->nr_regions; r++) {
		store_le64(region_at + 16 * r, s->regions[r].start);
		store_le64(region_at + 16 * r + 8, s->regions[r].nr_pages);
	}
	fp_at = region_at + s->nr_regions * PF_EXPORT_REGION_SIZE;
	if (nr_entries)
		export_entries(s, fp_at, fp_at + nr_entries * 8);
	return (ssize_t)size;
}
