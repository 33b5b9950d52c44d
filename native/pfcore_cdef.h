/*
 * cffi declarations of the pagefusion native core, mirroring pfcore.h.
 * Constants are written "..." so that cffi takes their values from the real
 * header when it compiles the extension.
 */
#define PF_PAGE_SIZE ...
#define PF_KEY_SIZE ...
#define PF_FP_ZERO ...
#define PF_FP_UNSEEN ...
#define PF_FP_FIRST ...
#define PF_BATCH_PAGES ...
#define PF_RUN_PAGES ...
#define PF_PAGEMAP_CHUNK ...
#define PF_FULL_READ_CYCLES ...
#define PF_MAX_GUEST_PAGES ...
#define PF_MAX_FOREIGN_SETS ...
#define PF_EXPORT_MAGIC ...
#define PF_EXPORT_VERSION ...
#define PF_EXPORT_HEADER_SIZE ...
#define PF_EXPORT_REGION_SIZE ...
#define PF_EXPORT_ENTRY_SIZE ...

struct pf_region {
	uint64_t start;
	uint64_t nr_pages;
};

struct pf_counters {
	uint64_t pages_total;
	uint64_t passes_per_cycle;
	uint64_t pages_scanned;
	uint64_t pages_zero;
	uint64_t pages_volatile;
	uint64_t pages_duplicate;
	uint64_t pages_unique;
	uint64_t pages_fusible;
	uint64_t pages_fusible_zero;
	uint64_t pages_foreign;
	uint64_t hash_collisions;
	uint64_t read_errors;
	uint64_t bytes_read;
	uint64_t pages_unread_shared;
};

struct pf_scanner;

int pf_fingerprint_pages(const uint8_t *key, const void *pages,
			 size_t nr_pages, uint64_t *fps);
int pf_page_is_zero(const void *page);
size_t pf_count_zero_mappings(const uint64_t *entries, size_t nr_entries,
                              uint64_t zero_pfn, uint64_t huge_zero_pfn,
                              uint64_t nr_huge_zero);

ssize_t pf_read_pages(int pid, uint64_t remote_addr, size_t nr_pages,
		      void *dst, uint8_t *page_ok, uint64_t *bytes_read);
ssize_t pf_read_page_list(int pid, const uint64_t *remote_addrs,
			  size_t nr_pages, void *dst, uint8_t *page_ok,
			  uint64_t *bytes_read);

int pf_scanner_new(int pid, const uint8_t *key, uint64_t pages_per_pass,
		   struct pf_scanner **scannerp);
void pf_scanner_free(struct pf_scanner *scanner);
int pf_scanner_set_regions(struct pf_scanner *scanner,
			   const struct pf_region *regions, size_t nr_regions);
int pf_scanner_pass(struct pf_scanner *scanner, struct pf_counters *counters);
ssize_t pf_scanner_export(struct pf_scanner *scanner, void *buf,
			  size_t buf_size);
int pf_scanner_load_foreign(struct pf_scanner *scanner, int pid,
			    const void *blob, size_t blob_size);
int pf_scanner_drop_foreign(struct pf_scanner *scanner, int pid);
size_t pf_scanner_foreign_pids(const struct pf_scanner *scanner, int *pids,
			       size_t max);
size_t pf_scanner_memory_bytes(const struct pf_scanner *scanner);
