package main

import (
	"context"
	"log/slog"
	"sync"
	"sync/atomic"

	"k8s.io/client-go/dynamic"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/authz/kube"
	"github.com/tokenauthz/tokenauthz/verify"
)

// inForce is the policy the server runs: the file config and, with
// kubernetes.enabled, the latest snapshot of the cluster's resources. A
// change to either is assembled with the other and swapped in at once; a
// check sees the old policy or the new one, never a mix.
type inForce struct {
	mu      sync.Mutex
	srv     *authz.Server
	bg      context.Context
	log     *slog.Logger
	cur     atomic.Pointer[verify.Verifier]
	file    *authz.Config
	snap    *kube.Snapshot
	watcher *kube.Watcher // nil without kubernetes.enabled
}

func newInForce(srv *authz.Server, v *verify.Verifier, file *authz.Config, bg context.Context, log *slog.Logger) *inForce {
	f := &inForce{srv: srv, bg: bg, log: log, file: file}
	f.cur.Store(v)
	return f
}

// setFile puts a reloaded file config in force with the cluster's
// policies; an error leaves everything as it was.
func (f *inForce) setFile(file *authz.Config) error {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.install(file, f.snap); err != nil {
		return err
	}
	f.file = file
	if f.watcher != nil {
		f.watcher.SetFile(file) // policies are checked against it again
	}
	return nil
}

// setSnapshot puts the cluster's latest accepted policies in force.
func (f *inForce) setSnapshot(s *kube.Snapshot) {
	f.mu.Lock()
	defer f.mu.Unlock()
	if err := f.install(f.file, s); err != nil {
		// The builder accepted only what compiles, so this is a bug or an
		// issuer the verifier refuses: the previous policies stay.
		f.log.Error("kubernetes policies not put in force; the previous ones stay", "error", err.Error())
		return
	}
	f.snap = s
}

func (f *inForce) install(file *authz.Config, snap *kube.Snapshot) error {
	cfg := file
	if f.watcher != nil {
		cfg = kube.Assemble(file, snap)
	}
	old := f.cur.Load()
	nv, err := old.Reload(cfg.AllIssuers())
	if err != nil {
		return err
	}
	if err := f.srv.Swap(cfg, nv); err != nil {
		return err
	}
	nv.Start(f.bg)
	f.cur.Store(nv)
	old.Retire(nv)
	return nil
}

// followCluster starts watching the cluster's policy resources.
func (f *inForce) followCluster(kc kube.Config) error {
	rc, err := kube.RestConfig()
	if err != nil {
		return err
	}
	rc.UserAgent = "tokenauthz"
	dyn, err := dynamic.NewForConfig(rc)
	if err != nil {
		return err
	}
	f.mu.Lock()
	f.watcher = kube.NewWatcher(dyn, kc, f.file, f.setSnapshot, f.log.With("source", "kubernetes"))
	f.mu.Unlock()
	go f.watcher.Run(f.bg)
	return nil
}

// ready: every issuer's keys loaded and, with kubernetes.enabled, the
// cluster's policies listed once.
func (f *inForce) ready() bool {
	if w := f.watcher; w != nil && !w.Synced() {
		return false
	}
	return f.cur.Load().Ready()
}
