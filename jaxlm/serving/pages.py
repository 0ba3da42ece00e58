"""The host side of the paged KV cache: which pages are free, shared or cached.

Pages hold ``page_size`` token slots of every layer (the device arrays live
in the engine). A page is *private* to the request writing it, *shared* when
several requests' block tables hold it (refcount > 1), and *cached* once it
is full: its key is the hash of its tokens and of everything before them
(the parent page's key), so a request whose prompt starts with the same
tokens can take the page instead of recomputing it (automatic prefix
caching). A cached page nobody holds stays until its slot is needed, least
recently used first.

Written here rather than taken from a library: the bookkeeping is a few
dicts, and it must match the engine's block tables exactly.
"""

from __future__ import annotations

import collections
import hashlib

import numpy as np

NULL_PAGE = 0   # never allocated: unused block-table entries point here


def page_keys(tokens, page_size: int, root: bytes) -> list[bytes]:
    """The cache key of every full page of ``tokens``: sha256 of (parent key, the page's tokens)."""
    keys, parent = [], root
    ids = np.asarray(tokens, np.int64)
    for start in range(0, len(ids) - page_size + 1, page_size):
        parent = hashlib.sha256(parent + ids[start:start + page_size].tobytes()).digest()
        keys.append(parent)
    return keys


class PagePool:
    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 2:
            raise ValueError(f"num_pages: need at least 2 (page 0 is reserved), got {num_pages}")
        self.num_pages, self.page_size = num_pages, page_size
        self.free: collections.deque[int] = collections.deque(range(1, num_pages))
        self.refs = np.zeros(num_pages, np.int32)
        self.by_key: dict[bytes, int] = {}
        self.key_of: dict[int, bytes] = {}
        self.idle: collections.OrderedDict[int, None] = collections.OrderedDict()  # cached, unheld: LRU order
        self.lookups = 0         # pages asked for by prefix lookups
        self.hits = 0            # ... and found

    # ------------------------------------------------------------ counting
    def available(self) -> int:
        """Pages a request could take now: free ones plus cached ones nobody holds."""
        return len(self.free) + len(self.idle)

    def used(self) -> int:
        return self.num_pages - 1 - self.available()

    # ---------------------------------------------------------- allocating
    def allocate(self, n: int) -> list[int] | None:
        """``n`` private pages (evicting least recently used cached ones), or None when there are not enough."""
        if n > self.available():
            return None
        pages = []
        for _ in range(n):
            if self.free:
                page = self.free.popleft()
            else:
                page, _ = self.idle.popitem(last=False)
                del self.by_key[self.key_of.pop(page)]
            self.refs[page] = 1
            pages.append(page)
        return pages

    def release(self, pages) -> None:
        """Drops one hold on each page; unheld cached pages stay cached, others become free."""
        for page in pages:
            self.refs[page] -= 1
            if self.refs[page] == 0:
                if page in self.key_of:
                    self.idle[page] = None
                else:
                    self.free.append(page)

    # -------------------------------------------------------- prefix cache
    def take_cached(self, keys: list[bytes]) -> list[int]:
        """The longest run of leading pages found under ``keys``, each now held once more."""
        pages = []
        self.lookups += len(keys)
        for key in keys:
            page = self.by_key.get(key)
            if page is None:
                break
            if self.refs[page] == 0:
                del self.idle[page]
            self.refs[page] += 1
            pages.append(page)
        self.hits += len(pages)
        return pages

    def register(self, page: int, key: bytes) -> None:
        """``page`` is full and holds the tokens ``key`` names: later prompts may share it."""
        if key in self.by_key or page in self.key_of:
            return  # another page already caches these tokens; this one stays private
        self.by_key[key] = page
        self.key_of[page] = key

    def hit_rate(self) -> float:
        return self.hits / self.lookups if self.lookups else 0.0
