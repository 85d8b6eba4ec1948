package main

import (
	"context"
	"crypto/sha256"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/verify"
)

// reloader puts a changed config file in force while the service runs. A
// new config is validated first and an invalid one leaves the old one in
// force; the swap is one atomic store, so a check sees the old policy or the
// new one, never a mix; issuers whose settings did not change keep their
// keys and cached answers.
type reloader struct {
	path   string
	log    *slog.Logger
	srv    *authz.Server
	bg     context.Context
	met    *metrics
	cur    atomic.Pointer[verify.Verifier]
	mu     sync.Mutex // one reload at a time
	inUse  *fileConfig
	digest [32]byte
}

func newReloader(path string, cfg *fileConfig, v *verify.Verifier, srv *authz.Server, bg context.Context, met *metrics, log *slog.Logger) *reloader {
	r := &reloader{path: path, log: log, srv: srv, bg: bg, met: met, inUse: cfg}
	r.cur.Store(v)
	if data, err := os.ReadFile(path); err == nil {
		r.digest = sha256.Sum256(data)
	}
	return r
}

// reload reads the file and puts it in force if it changed (always, when
// forced: SIGHUP also re-reads the secret and key files issuers name).
func (r *reloader) reload(why string, forced bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	data, err := os.ReadFile(r.path)
	if err != nil {
		r.rejected(why, err)
		return err
	}
	digest := sha256.Sum256(data)
	if digest == r.digest && !forced {
		return nil
	}
	cfg, err := parseConfig(data, r.path)
	if err != nil {
		r.rejected(why, err)
		return err
	}
	old := r.cur.Load()
	nv, err := old.Reload(cfg.Issuers)
	if err != nil {
		r.rejected(why, err)
		return err
	}
	if err := r.srv.Swap(&cfg.Config, nv); err != nil {
		r.rejected(why, err)
		return err
	}
	nv.Start(r.bg)
	r.cur.Store(nv)
	old.Retire(nv)
	if !reflect.DeepEqual(cfg.Server, r.inUse.Server) || !reflect.DeepEqual(cfg.Cache, r.inUse.Cache) {
		r.log.Warn("config reloaded, but the server and cache sections changed and take effect only on restart")
	}
	r.inUse, r.digest = cfg, digest
	r.met.reloads.WithLabelValues("ok").Inc()
	r.log.Info("config reloaded", "trigger", why, "issuers", len(cfg.Issuers), "routes", len(cfg.Routes))
	return nil
}

func (r *reloader) rejected(why string, err error) {
	r.met.reloads.WithLabelValues("rejected").Inc()
	r.log.Error("config reload rejected; the previous config stays in force", "trigger", why, "error", err.Error())
}

// watch reloads on SIGHUP and when the file's directory changes. The
// directory, not the file: Kubernetes updates a mounted ConfigMap by
// swapping a symlink, which a watch on the file itself would miss. A poll
// backs the watch up (events can be lost, and some volumes have none).
func (r *reloader) watch(ctx context.Context, hup <-chan os.Signal, poll time.Duration) {
	var events <-chan fsnotify.Event
	if w, err := fsnotify.NewWatcher(); err != nil {
		r.log.Warn("config watch unavailable; polling only", "error", err.Error())
	} else {
		defer w.Close()
		if err := w.Add(filepath.Dir(r.path)); err != nil {
			r.log.Warn("config watch unavailable; polling only", "error", err.Error())
		} else {
			events = w.Events
		}
	}
	tick := time.NewTicker(poll)
	defer tick.Stop()
	var settle <-chan time.Time
	for {
		select {
		case <-ctx.Done():
			return
		case <-hup:
			_ = r.reload("SIGHUP", true)
		case <-tick.C:
			_ = r.reload("poll", false)
		case <-events:
			// Editors and kubelet write in several steps: let them finish.
			settle = time.After(100 * time.Millisecond)
		case <-settle:
			_ = r.reload("file change", false)
		}
	}
}
