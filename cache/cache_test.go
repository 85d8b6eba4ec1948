package cache_test

import (
	"context"
	"errors"
	"fmt"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/tokenauthz/tokenauthz/cache"
)

type clock struct {
	mu  sync.Mutex
	now time.Time
}

func (c *clock) Now() time.Time      { c.mu.Lock(); defer c.mu.Unlock(); return c.now }
func (c *clock) Add(d time.Duration) { c.mu.Lock(); c.now = c.now.Add(d); c.mu.Unlock() }

func strSize(s string) int { return len(s) }

func TestExpiryFollowsTheClock(t *testing.T) {
	clk := &clock{now: time.Now()}
	c := cache.New(cache.Options{Now: clk.Now}, strSize)
	c.Set("k", "v", time.Minute)
	if v, ok := c.Peek("k"); !ok || v != "v" {
		t.Fatalf("Peek = %q, %v", v, ok)
	}
	clk.Add(59 * time.Second)
	if _, ok := c.Peek("k"); !ok {
		t.Fatal("expired before its ttl")
	}
	clk.Add(time.Second)
	if _, ok := c.Peek("k"); ok {
		t.Fatal("still served at its ttl")
	}
	c.Set("zero", "v", 0)
	if _, ok := c.Peek("zero"); ok {
		t.Fatal("a ttl of 0 must keep nothing")
	}
}

func TestConcurrentMissesShareOneLoad(t *testing.T) {
	c := cache.New(cache.Options{}, strSize)
	var loads atomic.Int64
	release := make(chan struct{})
	load := func(context.Context) (string, time.Duration, error) {
		loads.Add(1)
		<-release
		return "value", time.Minute, nil
	}
	var wg sync.WaitGroup
	errs := make(chan error, 100)
	for range 100 {
		wg.Go(func() {
			v, _, err := c.Get(context.Background(), "k", load)
			if err == nil && v != "value" {
				err = fmt.Errorf("got %q", v)
			}
			if err != nil {
				errs <- err
			}
		})
	}
	// Let every goroutine reach the flight before the load finishes.
	for c.Stats().Misses < 100 {
		time.Sleep(time.Millisecond)
	}
	close(release)
	wg.Wait()
	close(errs)
	for err := range errs {
		t.Error(err)
	}
	if n := loads.Load(); n != 1 {
		t.Fatalf("100 concurrent misses made %d loads, want 1", n)
	}
	if _, src, _ := c.Get(context.Background(), "k", load); src != cache.FromMemory {
		t.Fatal("the loaded value was not kept")
	}
}

func TestErrorsAreNotCached(t *testing.T) {
	c := cache.New(cache.Options{}, strSize)
	fail := errors.New("provider down")
	calls := 0
	load := func(context.Context) (string, time.Duration, error) {
		calls++
		if calls == 1 {
			return "", 0, fail
		}
		return "ok", time.Minute, nil
	}
	if _, _, err := c.Get(context.Background(), "k", load); !errors.Is(err, fail) {
		t.Fatalf("err = %v", err)
	}
	if v, _, err := c.Get(context.Background(), "k", load); err != nil || v != "ok" {
		t.Fatalf("after an error the next Get must load again: %q %v", v, err)
	}
}

func TestAWaiterThatGivesUpDoesNotCancelTheLoad(t *testing.T) {
	c := cache.New(cache.Options{}, strSize)
	started, release := make(chan struct{}), make(chan struct{})
	var loadErr atomic.Value
	load := func(ctx context.Context) (string, time.Duration, error) {
		close(started)
		<-release
		if ctx.Err() != nil {
			loadErr.Store(ctx.Err())
		}
		return "v", time.Minute, nil
	}
	ctx, cancel := context.WithCancel(context.Background())
	done := make(chan error)
	go func() { _, _, err := c.Get(ctx, "k", load); done <- err }()
	<-started
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("a cancelled waiter got %v", err)
	}
	close(release)
	// The load goes on and stores its value for the next caller.
	deadline := time.Now().Add(10 * time.Second)
	for {
		if _, ok := c.Peek("k"); ok {
			break
		}
		if time.Now().After(deadline) {
			t.Fatal("the load did not complete after its first waiter left")
		}
		time.Sleep(time.Millisecond)
	}
	if e := loadErr.Load(); e != nil {
		t.Fatalf("the load saw its context end: %v", e)
	}
}

func TestBoundedByBytes(t *testing.T) {
	c := cache.New(cache.Options{MaxBytes: 64 << 10}, strSize)
	big := string(make([]byte, 1024))
	for i := range 1000 {
		c.Set(fmt.Sprintf("k%d", i), big, time.Hour)
	}
	// ~1.3 KiB an entry with overhead: 64 KiB holds about 50.
	deadline := time.Now().Add(10 * time.Second)
	for c.Stats().Entries > 60 {
		if time.Now().After(deadline) {
			t.Fatalf("%d entries of 1 KiB held under a 64 KiB bound", c.Stats().Entries)
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func TestDoorkeeperAdmitsOnSecondOffer(t *testing.T) {
	d := cache.NewDoorkeeper(1 << 12)
	if d.Admit("a") {
		t.Fatal("a key offered once was admitted")
	}
	if !d.Admit("a") || !d.Admit("a") {
		t.Fatal("a key offered again was not admitted")
	}
	// Keys offered once each are not admitted (a slot that a fingerprint
	// collision admits early is possible in principle, at odds of about
	// 2^-50 here).
	for i := range 10_000 {
		if d.Admit(fmt.Sprint("once-", i)) {
			t.Fatalf("once-%d admitted on its first offer", i)
		}
	}
	// A table four times larger than the keys offered since remembers most
	// of them (a direct-mapped slot is lost only to a key of the same slot).
	d = cache.NewDoorkeeper(1 << 14)
	for i := range 4096 {
		d.Admit(fmt.Sprint("k", i))
	}
	kept := 0
	for i := range 4096 {
		if d.Admit(fmt.Sprint("k", i)) {
			kept++
		}
	}
	if kept < 3000 {
		t.Errorf("%d of 4096 keys remembered in 16384 slots", kept)
	}
}

func TestDoorkeeperConcurrent(t *testing.T) {
	d := cache.NewDoorkeeper(1024)
	var wg sync.WaitGroup
	for w := range 4 {
		wg.Go(func() {
			for i := range 5000 {
				d.Admit(fmt.Sprint(w, "-", i%300))
			}
		})
	}
	wg.Wait()
	d.Admit("after")
	if !d.Admit("after") {
		t.Error("a key offered twice after the run was not admitted")
	}
}
