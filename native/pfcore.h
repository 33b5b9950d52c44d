/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * pfcore.h - native core of the pagefusion fusion worker
 *
 * A fusion worker watches one QEMU process and tells the daemon how much of
 * its guest RAM the kernel's KSM could merge, so that the daemon can pace
 * KSM (pages_to_scan, sleep_millisecs) instead of letting it burn a core on
 * memory that will never merge.  This core does the per-page work: it reads
 * guest RAM, fingerprints it and classifies every page it looked at.  It
 * never merges anything itself and never writes to the guest.
 *
 * Reading guest RAM
 *
 *   Pages are copied out of the QEMU process by reading /proc/PID/mem,
 *   opened read-only: no ptrace attach, never a write, never
 *   process_vm_writev().  process_vm_readv() is not used either: it pins
 *   what it reads, and since Linux 5.19 a read-only pin of an anonymous
 *   page shared by KSM unshares the page first, so a reader using it would
 *   undo the very merges it measures.  Adjacent pages go into one pread(),
 *   so a batch of pages costs a few system calls (and more per process
 *   whose pages confirm duplicates).  When a page cannot be read (its range
 *   was unmapped by a hot-unplug, or it is PROT_NONE) the kernel stops at
 *   that page; the reader marks it failed, zero-fills its copy and resumes
 *   with the next page.  ESRCH means the process is gone and ends the whole
 *   read.  Reading faults pages in: a
 *   never-touched page maps the shared zero page (no RAM is spent, and it
 *   counts as a zero page although KSM gains nothing from it) but a
 *   swapped-out page is swapped back in, so on a host under memory pressure
 *   the daemon should keep the per-pass budget small.  The caller hands in
 *   only mergeable areas, which are private anonymous memory, so reading a
 *   hole never allocates shmem pages.
 *
 * Fingerprint (keyed 64-bit hash of one 4096-byte page)
 *
 *   The page is cut into 64 stripes of 64 bytes; each stripe gives one
 *   little-endian 64-bit word to each of 8 independent lanes.  For word w
 *   in lane i:
 *
 *	v        = w ^ mask[i]
 *	prod[i] += low32(v) * high32(v)		(32x32->64 multiply)
 *	sum[i]  += w
 *	mask[i] += step[i]			(after every stripe)
 *
 *   mask[i] and step[i] come from the 128-bit key, so the multiplier inputs
 *   are unknown without it, and the mask is different at every stripe so
 *   that moving data between stripes changes the products.  The plain sum
 *   keeps the information a product loses when one half of v is zero.
 *   Finalisation folds each lane pair with a keyed 64x64->128 multiply
 *   (low ^ high), adds the eight folds to a keyed seed and runs a
 *   xorshift-multiply avalanche.  The 32x32->64 multiply is what SSE2
 *   (pmuludq) and NEON (umlal) do on two lanes at once, so the loop runs at
 *   a few bytes per cycle per core and stays memory bound.  Key expansion:
 *   word j of the schedule is mix(k0 ^ mix(k1 + (j + 1) * 0x9e3779b97f4a7c15))
 *   where mix is the avalanche and k0, k1 are the key's little-endian halves.
 *
 *   What it guarantees: the same key and the same bytes give the same value
 *   on every host and architecture (the SIMD and scalar paths agree bit for
 *   bit).  An all-zero page always gets PF_FP_ZERO, found by a cheap
 *   OR-scan before hashing, and no other page ever does; PF_FP_UNSEEN is
 *   never produced either (outputs below PF_FP_FIRST are moved up by
 *   PF_FP_FIRST).  For ordinary memory contents the values are expected
 *   to spread like those of a random 64-bit function (an expectation backed
 *   by tests, not a proven bound): among 2^22 pages (16 GiB) a chance
 *   collision would then turn up about once in two million full scans.
 *
 *   What it does not guarantee: it is not a MAC and not collision resistant
 *   against someone who knows the key.  A guest does not know the key (it
 *   is random per host boot and stays in the host), but nothing here relies
 *   on that for correctness: a fingerprint match is only a candidate, every
 *   duplicate is confirmed by comparing the bytes, and a collision costs one
 *   extra page read and compare (counted in hash_collisions) and at worst
 *   hides one duplicate from the counts.
 *
 * Classification
 *
 *   Per guest page the scanner keeps the fingerprint of its last
 *   observation and a "stable" bit.  Each scanned page falls in exactly one
 *   class, tested in this order:
 *
 *   volatile	the page was observed before and its fingerprint differs
 *		from that observation (a page seen for the first time is
 *		never volatile);
 *   zero	all bytes zero;
 *   duplicate	another page holds the same bytes, confirmed by memcmp: the
 *		representative of the fingerprint in this process (the first
 *		page that showed it), or else a page of a foreign set loaded
 *		with pf_scanner_load_foreign(), read from that process;
 *   unique	everything else, including the representative of a group of
 *		identical pages of this process.
 *
 *   A page is stable when two observations at least one pass apart gave the
 *   same fingerprint: its scan in this pass against its previous scan, or,
 *   for a representative read again to confirm a duplicate, that read
 *   against its last scan if the last scan was in an earlier pass.
 *
 *   fusible	duplicate or zero pages that KSM could merge now: the page is
 *		stable and so is its copy (pages of foreign sets are stable
 *		by construction).  Stable zero pages are also counted on
 *		their own in pages_fusible_zero.
 *
 *   So k identical stable pages in this process count k - 1 duplicates and
 *   k - 1 fusible pages, with the representative unique: the saving KSM
 *   would make.  If the contents also exist in the foreign set of a process
 *   with a lower pid, the representative is a duplicate too (of the foreign
 *   page), so all k count: this domain's copies can all merge into the
 *   other domain's.  Sets of higher pids are not consulted: of a content
 *   spread over several domains the lowest pid keeps its copy, and the sum
 *   of fusible pages over domains is the saving KSM would make.
 *
 * Bounded cost: sampling
 *
 *   The guest's mergeable areas form one page index space (region by region
 *   in address order), cut into runs of R = min(PF_RUN_PAGES, budget)
 *   pages.  With runs_per_pass = budget / R and T runs in all, a cycle has
 *   S = ceil(T / runs_per_pass) passes (S = 1 when the budget covers the
 *   guest) and pass number p scans the runs j with j % S == p % S.  A pass
 *   never exceeds its page budget, samples the whole guest evenly, and S
 *   passes look at every page exactly once.
 *
 * Pages KSM already shares are not read again
 *
 *   Once a guest is fused, most of its RAM is KSM pages (or the kernel's
 *   zero page), and copying them out at every pass would be the worker's
 *   main cost.  A pass therefore reads the guest's /proc/PID/pagemap first
 *   (8 bytes per page, no page contents) and leaves out a page that is
 *   present and not exclusively mapped (bit 56 clear), whose last look
 *   found it stable and classified it zero, duplicate or unique.  In a QEMU
 *   process, which does not fork, an anonymous page mapped more than once
 *   is a KSM page or the zero page; both are write-protected, so while it
 *   stays mapped its contents cannot have changed: a write would have
 *   replaced it with a private, exclusive page, which the pass reads.  Such
 *   a page counts in its last class and in pages_unread_shared.  What this
 *   can miss (a page copied on write and merged again into another KSM
 *   page between two looks; a foreign set that changed under a duplicate)
 *   is corrected by a pass that reads every page: the first cycle, and
 *   every PF_FULL_READ_CYCLES-th cycle after it.  If pagemap cannot be
 *   read, every page is read.
 *
 * Memory
 *
 *   Per guest page: the 8-byte fingerprint and a 1-byte flag; the
 *   fingerprint index is an open-addressing table (linear probing, home slot
 *   from the fingerprint's high bits) of 4-byte page references plus 1-byte
 *   tags, sized 4/3 of the page count, so about 15.7 bytes per page, 4 MiB
 *   per GiB of guest RAM.  Fixed: two batch buffers of PF_BATCH_PAGES pages
 *   (2 MiB).  A loaded foreign set costs 12 bytes per entry plus a bucket
 *   directory of at most 2 bytes per entry.  pf_scanner_memory_bytes()
 *   reports the total.
 *
 * Conventions
 *
 *   Functions return 0 (or a count) on success and a negative errno value
 *   on failure; nothing aborts and nothing prints.  A scanner belongs to one
 *   thread at a time; the free functions keep no global state.
 */
#ifndef PAGEFUSION_PFCORE_H
#define PAGEFUSION_PFCORE_H

#include <stddef.h>
#include <stdint.h>
#include <sys/types.h>

#define PF_PAGE_SIZE		4096
#define PF_KEY_SIZE		16

/* Reserved fingerprints: a hash never takes a value below PF_FP_FIRST. */
#define PF_FP_ZERO		0
#define PF_FP_UNSEEN		1
#define PF_FP_FIRST		2

/* Remote ranges in one process_vm_readv() call: the kernel's IOV_MAX. */
/* Pages read, fingerprinted and classified together. */
#define PF_BATCH_PAGES		256
/* Contiguous pages a sampled pass reads at a time. */
#define PF_RUN_PAGES		16
/* Pagemap entries read at a time (32 KiB). */
#define PF_PAGEMAP_CHUNK	4096
/* Every this many cycles, a cycle reads every page, shared or not. */
#define PF_FULL_READ_CYCLES	8
/* Largest guest, in pages (8 TiB); page references in the index are 32 bits. */
#define PF_MAX_GUEST_PAGES	(1ULL << 31)
#define PF_MAX_FOREIGN_SETS	256

/*
 * Published fingerprint set (pf_scanner_export), all little-endian:
 *
 *	 0  u32 magic		PF_EXPORT_MAGIC ("PFFP")
 *	 4  u16 version		PF_EXPORT_VERSION
 *	 6  u16 header size	PF_EXPORT_HEADER_SIZE
 *	 8  u32 nr_regions
 *	12  u32 nr_entries
 *	16  u64 key id		schedule word 33 of the key: sets made with
 *				another key are refused
 *	24  u64 nr_pages	pages in all regions
 *	32  nr_regions x { u64 start address, u64 nr_pages }
 *	    nr_entries x u64 fingerprint, strictly ascending
 *	    nr_entries x u32 page index into the regions' page index space
 *
 * One entry per distinct stable non-zero fingerprint, naming its
 * representative page.
 */
#define PF_EXPORT_MAGIC		0x50464650
#define PF_EXPORT_VERSION	1
#define PF_EXPORT_HEADER_SIZE	32
#define PF_EXPORT_REGION_SIZE	16
#define PF_EXPORT_ENTRY_SIZE	12

/* One mergeable area of the guest process; start is page aligned. */
struct pf_region {
	uint64_t start;
	uint64_t nr_pages;
};

/* What one pass saw; see the overview for the exact classes. */
struct pf_counters {
	uint64_t pages_total;		/* pages in the regions */
	uint64_t passes_per_cycle;	/* S: passes that cover every page */
	uint64_t pages_scanned;		/* classified this pass, read or not */
	uint64_t pages_zero;
	uint64_t pages_volatile;
	uint64_t pages_duplicate;
	uint64_t pages_unique;
	uint64_t pages_fusible;		/* stable duplicate or zero pages */
	uint64_t pages_fusible_zero;	/* the zero pages among them */
	uint64_t pages_foreign;		/* duplicates of a foreign page */
	uint64_t hash_collisions;	/* same fingerprint, other bytes */
	uint64_t read_errors;		/* pages of the guest not readable */
	uint64_t bytes_read;		/* copied from any process */
	uint64_t pages_unread_shared;	/* shared by KSM, unchanged: not read */
};

struct pf_scanner;

/*
 * Fingerprint nr_pages consecutive pages of a local buffer into fps[].
 * The buffer needs no alignment.  Returns 0 or -EINVAL.
 */
int pf_fingerprint_pages(const uint8_t *key, const void *pages,
			 size_t nr_pages, uint64_t *fps);

/* Returns 1 if the page at @page is all zero, else 0. */
int pf_page_is_zero(const void *page);

/*
 * Count the /proc/PID/pagemap entries that map the kernel's zero page
 * (zero_pfn) or one page of its huge zero page (nr_huge_zero pages from
 * huge_zero_pfn; 0 if there is none).  Such pages read as zeros but cost no
 * RAM and KSM never merges them.  Entries without the present bit (63) are
 * not counted.
 */
size_t pf_count_zero_mappings(const uint64_t *entries, size_t nr_entries,
			      uint64_t zero_pfn, uint64_t huge_zero_pfn,
			      uint64_t nr_huge_zero);

/*
 * Read nr_pages pages starting at remote_addr (page aligned) of process pid
 * into dst.  page_ok (may be NULL) gets 1 per page read and 0 per page that
 * could not be read; the copy of such a page is zero-filled.  bytes_read
 * (may be NULL) is increased by the bytes copied.  Returns the number of
 * pages read, or -ESRCH (process gone), -EPERM, -ENOMEM, -EINVAL.
 */
ssize_t pf_read_pages(int pid, uint64_t remote_addr, size_t nr_pages,
		      void *dst, uint8_t *page_ok, uint64_t *bytes_read);

/* Same for a list of page-aligned addresses, read in list order. */
ssize_t pf_read_page_list(int pid, const uint64_t *remote_addrs,
			  size_t nr_pages, void *dst, uint8_t *page_ok,
			  uint64_t *bytes_read);

/*
 * A scanner for process pid with a 16-byte key and a per-pass page budget.
 * Returns 0 and sets *scannerp, or -EINVAL, -ENOMEM.
 */
int pf_scanner_new(int pid, const uint8_t *key, uint64_t pages_per_pass,
		   struct pf_scanner **scannerp);
void pf_scanner_free(struct pf_scanner *scanner);

/*
 * Set the guest's mergeable areas, sorted and not overlapping.  Pages that
 * stay mapped keep their history; the others are forgotten.  Returns 0,
 * -EINVAL (unaligned, unsorted, empty region), -E2BIG (more than
 * PF_MAX_GUEST_PAGES) or -ENOMEM.
 */
int pf_scanner_set_regions(struct pf_scanner *scanner,
			   const struct pf_region *regions, size_t nr_regions);

/*
 * Scan one pass and fill counters.  Returns 0, -ESRCH when the process is
 * gone, -EPERM when it may not be read, -ENOMEM.
 */
int pf_scanner_pass(struct pf_scanner *scanner, struct pf_counters *counters);

/*
 * Write the stable fingerprint set in the published format.  With buf NULL
 * only the size needed is returned.  Returns the size written or needed,
 * or -ENOSPC when buf_size is too small.
 */
ssize_t pf_scanner_export(struct pf_scanner *scanner, void *buf,
			  size_t buf_size);

/*
 * Register (or replace) the set another worker published for process pid.
 * Returns 0, -EINVAL (malformed, or pid is the scanner's own),
 * -EKEYREJECTED (made with another key), -ENOSPC (too many sets), -ENOMEM.
 * A set whose process can no longer be read is dropped during a pass.
 */
int pf_scanner_load_foreign(struct pf_scanner *scanner, int pid,
			    const void *blob, size_t blob_size);

/* Forget the set of pid.  Returns 0 or -ENOENT. */
int pf_scanner_drop_foreign(struct pf_scanner *scanner, int pid);

/* Store up to max pids of the loaded sets; returns how many there are. */
size_t pf_scanner_foreign_pids(const struct pf_scanner *scanner, int *pids,
			       size_t max);

/* Bytes of memory the scanner holds, foreign sets included. */
size_t pf_scanner_memory_bytes(const struct pf_scanner *scanner);

#endif /* PAGEFUSION_PFCORE_H */
