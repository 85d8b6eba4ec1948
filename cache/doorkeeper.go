package cache

import (
	"hash/maphash"
	"math/bits"
	"sync/atomic"
)

// Doorkeeper remembers keys offered once, so that a cache keeps only keys
// that come back: the first offer of a key is noted, not kept; an offer
// while it is still noted is kept. This is TinyLFU's doorkeeper (Einziger,
// Friedman and Manes, 2017). A client that mints a token for every request
// then costs the verified-token cache no entry, no eviction of an entry
// that is read, and no objects for the collector to mark and sweep; a token
// that is used again costs one more verification, once.
//
// It is a direct-mapped table of 64-bit fingerprints: fixed memory (8 bytes
// a slot), no pointers, no locks. A key whose slot another key took before
// it came back is noted again, and a fingerprint collision admits a key one
// offer early. Neither matters beyond speed: the doorkeeper only decides
// whether to keep a result that was already computed.
type Doorkeeper struct {
	seed  maphash.Seed
	slots []atomic.Uint64
	mask  uint64
}

// NewDoorkeeper makes a doorkeeper of at least slots slots (a power of two,
// 1024 or more). A key offered once is remembered until about slots other
// one-off keys have been offered.
func NewDoorkeeper(slots int) *Doorkeeper {
	n := 1 << max(10, bits.Len(uint(max(slots, 1)-1)))
	return &Doorkeeper{seed: maphash.MakeSeed(), slots: make([]atomic.Uint64, n), mask: uint64(n - 1)}
}

// Admit reports whether key was offered before and is still remembered, and
// remembers it either way.
func (d *Doorkeeper) Admit(key string) bool {
	h := maphash.String(d.seed, key)
	fp := h | 1 // 0 is an empty slot
	s := &d.slots[(h>>1)&d.mask]
	if s.Load() == fp {
		return true
	}
	s.Store(fp)
	return false
}
