package main

import (
	"bytes"
	"context"
	"crypto/sha256"
	"fmt"
	"log/slog"
	"os"
	"path/filepath"
	"reflect"
	"slices"
	"strings"
	"sync"
	"sync/atomic"
	"time"

	"github.com/fsnotify/fsnotify"

	"github.com/tokenauthz/tokenauthz/cache"
)

// reloader puts a changed config file, or a changed file it names, in
// force while the service runs. A new config is validated first and an
// invalid one leaves the old one in force; the swap is one atomic store, so
// a check sees the old policy or the new one, never a mix; issuers whose
// settings and files did not change keep their keys and cached answers.
//
// The files a config names (key sets, HMAC and client secrets, the admin
// token, the Redis HMAC key) are part of it: a change to one is a reload,
// validated the same way. The Redis password is read again for every new
// connection instead (cache.RedisConfig).
type reloader struct {
	path   string
	log    *slog.Logger
	policy *inForce
	met    *metrics
	live   *live
	shared *cache.Shared // nil without Redis
	mu     sync.Mutex    // one reload at a time
	inUse  *fileConfig
	digest [32]byte
	// lastBad is the digest of the last rejected state, reported once, not
	// on every poll.
	lastBad [32]byte
	// watched are the directories of the config and the files it names,
	// for the watch loop to add.
	watched atomic.Pointer[[]string]
}

func newReloader(path string, cfg *fileConfig, policy *inForce, met *metrics,
	log *slog.Logger, lv *live, shared *cache.Shared) *reloader {
	r := &reloader{path: path, log: log, policy: policy, met: met, inUse: cfg, live: lv, shared: shared}
	// The file may have changed since cfg was read from it: its digest
	// counts as in force only if it still says the same, else the first
	// poll or event reloads it.
	if data, err := os.ReadFile(path); err == nil {
		if now, err := parseConfig(data, path); err == nil && reflect.DeepEqual(now, cfg) {
			r.digest = digestOf(data, cfg)
		}
	}
	r.setWatched(cfg)
	return r
}

// digestOf identifies a config and the contents of every file it names.
func digestOf(data []byte, cfg *fileConfig) [32]byte {
	h := sha256.New()
	h.Write(data)
	for _, f := range cfg.referencedFiles() {
		h.Write([]byte("\x00" + f + "\x00"))
		if b, err := os.ReadFile(f); err == nil {
			h.Write(b)
		} else {
			h.Write([]byte("\x00error: " + err.Error()))
		}
	}
	var d [32]byte
	h.Sum(d[:0])
	return d
}

func (r *reloader) setWatched(cfg *fileConfig) {
	dirs := []string{filepath.Dir(r.path)}
	for _, f := range cfg.referencedFiles() {
		if d := filepath.Dir(f); !slices.Contains(dirs, d) {
			dirs = append(dirs, d)
		}
	}
	r.watched.Store(&dirs)
}

// reload reads the config and the files it names and puts them in force if
// any changed (always, when forced by SIGHUP).
func (r *reloader) reload(why string, forced bool) error {
	r.mu.Lock()
	defer r.mu.Unlock()
	data, err := readSettled(r.path)
	if err != nil {
		r.rejected(why, [32]byte{}, err)
		return err
	}
	cfg, err := parseConfig(data, r.path)
	// A config that does not validate names no files we can trust; the
	// files of the one in force stand in, so a fix to one of them counts as
	// a change.
	digest := digestOf(data, r.inUse)
	if err == nil {
		digest = digestOf(data, cfg)
	}
	// Unchanged, or the same rejected state again: nothing to do or say.
	if !forced && (digest == r.digest || digest == r.lastBad) {
		return nil
	}
	if err != nil {
		r.rejected(why, digest, err)
		return err
	}
	adminToken, err := cache.ReadSecret(cfg.Server.AdminTokenFile, cfg.Server.AdminTokenEnv)
	if err != nil {
		r.rejected(why, digest, fmt.Errorf("admin token: %w", err))
		return err
	}
	var macKey []byte
	if rc := cfg.Cache.Redis; rc != nil && r.shared != nil && (rc.HMACKeyFile != "" || rc.HMACKeyEnv != "") {
		if macKey, err = cache.ReadSecret(rc.HMACKeyFile, rc.HMACKeyEnv); err == nil && len(macKey) < 32 {
			err = fmt.Errorf("at least 32 bytes, have %d", len(macKey))
		}
		if err != nil {
			r.rejected(why, digest, fmt.Errorf("redis hmac key: %w", err))
			return err
		}
	}
	if key := restartOnlyChange(r.inUse, cfg); key != "" {
		err := fmt.Errorf("%s changed, and takes effect only on a restart: restart the pods to apply this config", key)
		r.rejected(why, digest, err)
		return err
	}
	if err := r.policy.setFile(&cfg.Config); err != nil {
		r.rejected(why, digest, err)
		return err
	}
	r.live.set(cfg, adminToken)
	if macKey != nil {
		if err := r.shared.SetHMACKey(macKey); err != nil {
			r.log.Warn("redis hmac key not changed", "error", err.Error())
		}
	}
	r.inUse, r.digest = cfg, digest
	r.setWatched(cfg)
	r.met.reloads.WithLabelValues("ok").Inc()
	r.log.Info("config reloaded", "trigger", why, "issuers", len(cfg.Issuers), "routes", len(cfg.Routes))
	return nil
}

// liveKeys are the server and cache settings a reload puts in force: the
// admin token, the default revocation ttl and the Redis HMAC key. Every
// other setting of those sections (listeners, TLS, logging, Redis
// connection, cache sizes) is read once at start.
var liveKeys = map[string]bool{
	"server.admin_token_file": true, "server.admin_token_env": true, "server.revocation_ttl": true,
	"cache.redis.hmac_key_file": true, "cache.redis.hmac_key_env": true,
}

// restartOnlyChange names the first setting that differs between the config
// in force and next and that a reload cannot put in force (""): such a
// reload is refused, so that what the file says is what runs.
func restartOnlyChange(cur, next *fileConfig) string {
	if d := firstDiff("server", reflect.ValueOf(cur.Server), reflect.ValueOf(next.Server)); d != "" {
		return d
	}
	if !reflect.DeepEqual(cur.HTTPAuthz, next.HTTPAuthz) {
		return "http_authz"
	}
	if !reflect.DeepEqual(cur.DecisionLog, next.DecisionLog) {
		return "decision_log"
	}
	if cur.Kubernetes.Enabled != next.Kubernetes.Enabled || !reflect.DeepEqual(cur.Kubernetes.Namespaces, next.Kubernetes.Namespaces) ||
		!reflect.DeepEqual(cur.Kubernetes.HostDelegation, next.Kubernetes.HostDelegation) {
		return "kubernetes"
	}
	return firstDiff("cache", reflect.ValueOf(cur.Cache), reflect.ValueOf(next.Cache))
}

// firstDiff walks two values of one struct type by their YAML keys and
// names the first restart-only key where they differ.
func firstDiff(key string, a, b reflect.Value) string {
	if liveKeys[key] {
		return ""
	}
	if a.Kind() == reflect.Pointer {
		if a.IsNil() || b.IsNil() {
			if a.IsNil() != b.IsNil() && !(a.IsNil() && allLive(key, b.Elem())) && !(b.IsNil() && allLive(key, a.Elem())) {
				return key
			}
			return ""
		}
		a, b = a.Elem(), b.Elem()
	}
	if a.Kind() != reflect.Struct {
		if !reflect.DeepEqual(a.Interface(), b.Interface()) {
			return key
		}
		return ""
	}
	for i := range a.NumField() {
		name, _, _ := strings.Cut(a.Type().Field(i).Tag.Get("yaml"), ",")
		if name == "" || name == "-" {
			continue
		}
		if d := firstDiff(key+"."+name, a.Field(i), b.Field(i)); d != "" {
			return d
		}
	}
	return ""
}

// allLive: v (a section that appeared or went away) sets only live keys.
func allLive(key string, v reflect.Value) bool {
	return firstDiff(key, v, reflect.Zero(v.Type())) == ""
}

// readSettled reads a file once its contents hold still: a writer that
// truncates and rewrites in place (an editor, "cat > file") can be caught
// half-way, and a half-written YAML file may still parse. Reads 50 ms apart
// must agree; after 2 s of changes the last read is returned, and
// validation decides. Renaming a complete file into place, or Kubernetes'
// symlink swap of a ConfigMap, is atomic and never needs this.
func readSettled(path string) ([]byte, error) {
	return readSettledWith(func() ([]byte, error) { return os.ReadFile(path) }, func() { time.Sleep(50 * time.Millisecond) })
}

func readSettledWith(read func() ([]byte, error), pause func()) ([]byte, error) {
	prev, err := read()
	if err != nil {
		return nil, err
	}
	for range 40 {
		pause()
		cur, err := read()
		if err != nil {
			return nil, err
		}
		if bytes.Equal(cur, prev) {
			return cur, nil
		}
		prev = cur
	}
	return prev, nil
}

func (r *reloader) rejected(why string, digest [32]byte, err error) {
	r.lastBad = digest
	r.met.reloads.WithLabelValues("rejected").Inc()
	r.log.Error("config reload rejected; the previous config stays in force", "trigger", why, "error", err.Error())
}

// watch reloads on SIGHUP and when the directory of the config, or of a
// file it names, changes. The directory, not the file: Kubernetes updates a mounted ConfigMap by
// swapping a symlink, which a watch on the file itself would miss. A poll
// backs the watch up (events can be lost, and some volumes have none).
func (r *reloader) watch(ctx context.Context, hup <-chan os.Signal, poll time.Duration) {
	var events <-chan fsnotify.Event
	w, err := fsnotify.NewWatcher()
	if err != nil {
		r.log.Warn("config watch unavailable; polling only", "error", err.Error())
		w = nil
	} else {
		defer w.Close()
		events = w.Events
		r.addWatches(w)
	}
	// A change made before the watch was set up would wait for the poll.
	_ = r.reload("watch started", false)
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
			if w != nil {
				r.addWatches(w) // a reload may name files in other directories
			}
		}
	}
}

// addWatches watches the directories of the config and the files it names
// (adding one already watched is a no-op). A directory that cannot be
// watched is left to the poll.
func (r *reloader) addWatches(w *fsnotify.Watcher) {
	for _, d := range *r.watched.Load() {
		if err := w.Add(d); err != nil {
			r.log.Warn("cannot watch a config directory; polling it", "dir", d, "error", err.Error())
		}
	}
}
