// Package decisionlog writes one structured event per decision, for audit
// ("who was allowed to what, and why"): JSON lines to stdout, or OTLP logs
// through the OpenTelemetry log SDK when OTEL_LOGS_EXPORTER or an OTLP
// endpoint is set. Events are sampled by outcome, rate-limited, masked
// (a keyed hash, so events still correlate), and go through a bounded
// buffer: a slow or unreachable sink drops events, counted, and never
// slows a Check. An event never holds a token, a proof or a secret.
package decisionlog

import (
	"context"
	"crypto/hmac"
	crand "crypto/rand"
	"crypto/sha256"
	"encoding/hex"
	"encoding/json"
	"fmt"
	"io"
	"math/rand/v2"
	"os"
	"strings"
	"sync/atomic"

	"go.opentelemetry.io/contrib/exporters/autoexport"
	"go.opentelemetry.io/otel/attribute"
	otellog "go.opentelemetry.io/otel/log"
	sdklog "go.opentelemetry.io/otel/sdk/log"
	"golang.org/x/time/rate"

	"github.com/tokenauthz/tokenauthz/authz"
	"github.com/tokenauthz/tokenauthz/cache"
)

// Config is the file config's decision_log section. Logging is on when
// the section is there.
type Config struct {
	// Allows and Denies are the fractions of each logged (0 to 1).
	// Defaults 0.01 and 1.
	Allows *float64 `yaml:"allows"`
	Denies *float64 `yaml:"denies"`
	// MaxPerSecond bounds events per pod (default 1000); the rest are
	// dropped and counted.
	MaxPerSecond int `yaml:"max_per_second"`
	// Mask lists fields whose values are replaced by a keyed hash: sub,
	// client_id, issuer, route, request.host, request.path.
	Mask []string `yaml:"mask"`
	// MaskKeyFile holds the hash key (32+ bytes), the same on every pod so
	// masked values correlate across the fleet. Default: a random key per
	// process.
	MaskKeyFile string `yaml:"mask_key_file"`
	// Buffer is how many events may wait for the sink (default 4096).
	Buffer int `yaml:"buffer"`
}

var maskable = map[string]bool{"sub": true, "client_id": true, "issuer": true, "route": true, "request.host": true, "request.path": true}

// Validate returns the section's problems, each naming its key.
func (c *Config) Validate() []string {
	var p []string
	for _, f := range []struct {
		key string
		v   *float64
	}{{"allows", c.Allows}, {"denies", c.Denies}} {
		if f.v != nil && (*f.v < 0 || *f.v > 1) {
			p = append(p, "decision_log."+f.key+": a fraction between 0 and 1")
		}
	}
	if c.MaxPerSecond < 0 || c.Buffer < 0 {
		p = append(p, "decision_log.max_per_second: must be positive (and so must buffer)")
	}
	for i, m := range c.Mask {
		if !maskable[m] {
			p = append(p, fmt.Sprintf("decision_log.mask[%d]: %q is not one of sub, client_id, issuer, route, request.host, request.path", i, m))
		}
	}
	if c.MaskKeyFile != "" {
		if k, err := cache.ReadSecret(c.MaskKeyFile, ""); err != nil {
			p = append(p, "decision_log.mask_key_file: "+err.Error())
		} else if len(k) < 32 {
			p = append(p, fmt.Sprintf("decision_log.mask_key_file: at least 32 bytes, have %d", len(k)))
		}
	}
	return p
}

// Logger is an authz.DecisionLogger.
type Logger struct {
	allows, denies float64
	limit          *rate.Limiter
	mask           map[string]bool
	key            []byte
	pod            string
	events         chan authz.DecisionEvent
	done           chan struct{}
	emit           func(authz.DecisionEvent) // the sink
	flush          func(context.Context) error

	// Dropped counts events not written: over max_per_second, or the
	// buffer full because the sink is slow.
	RateLimited, BufferFull atomic.Int64
	Written                 atomic.Int64
}

// New starts a logger writing to w (JSON lines), or to OTLP logs when the
// environment asks for them (OTEL_LOGS_EXPORTER, an OTLP endpoint).
func New(ctx context.Context, c Config, w io.Writer) (*Logger, error) {
	l := &Logger{allows: 0.01, denies: 1, mask: map[string]bool{}, done: make(chan struct{})}
	if c.Allows != nil {
		l.allows = *c.Allows
	}
	if c.Denies != nil {
		l.denies = *c.Denies
	}
	perSecond := c.MaxPerSecond
	if perSecond == 0 {
		perSecond = 1000
	}
	l.limit = rate.NewLimiter(rate.Limit(perSecond), perSecond)
	buf := c.Buffer
	if buf == 0 {
		buf = 4096
	}
	l.events = make(chan authz.DecisionEvent, buf)
	for _, m := range c.Mask {
		l.mask[m] = true
	}
	if c.MaskKeyFile != "" {
		k, err := cache.ReadSecret(c.MaskKeyFile, "")
		if err != nil {
			return nil, err
		}
		l.key = k
	} else {
		l.key = make([]byte, 32)
		_, _ = crand.Read(l.key)
	}
	l.pod = os.Getenv("POD_NAME")
	if l.pod == "" {
		l.pod, _ = os.Hostname()
	}
	if otlpWanted() {
		exp, err := autoexport.NewLogExporter(ctx)
		if err != nil {
			return nil, fmt.Errorf("decision log: OTLP exporter: %w", err)
		}
		lp := sdklog.NewLoggerProvider(sdklog.WithProcessor(sdklog.NewBatchProcessor(exp)))
		logger := lp.Logger("github.com/tokenauthz/tokenauthz/decisionlog")
		l.emit = func(ev authz.DecisionEvent) { logger.Emit(context.Background(), record(ev)) }
		l.flush = lp.Shutdown
	} else {
		enc := json.NewEncoder(w)
		l.emit = func(ev authz.DecisionEvent) { _ = enc.Encode(ev) }
	}
	go l.run()
	return l, nil
}

func otlpWanted() bool {
	for _, k := range []string{"OTEL_LOGS_EXPORTER", "OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_LOGS_ENDPOINT"} {
		if os.Getenv(k) != "" {
			return os.Getenv("OTEL_LOGS_EXPORTER") != "none"
		}
	}
	return false
}

func (l *Logger) run() {
	defer close(l.done)
	for ev := range l.events {
		l.emit(ev)
		l.Written.Add(1)
	}
}

// Close writes what is buffered and stops.
func (l *Logger) Close(ctx context.Context) error {
	close(l.events)
	select {
	case <-l.done:
	case <-ctx.Done():
		return ctx.Err()
	}
	if l.flush != nil {
		return l.flush(ctx)
	}
	return nil
}

// Sample reports whether a decision of this outcome is logged: the check
// builds no event for one that is not.
func (l *Logger) Sample(allow bool) bool {
	r := l.denies
	if allow {
		r = l.allows
	}
	return r >= 1 || r > 0 && rand.Float64() < r
}

// Log queues ev: never blocks. Over the rate or with the buffer full, the
// event is dropped and counted.
func (l *Logger) Log(ev authz.DecisionEvent) {
	if !l.limit.Allow() {
		l.RateLimited.Add(1)
		return
	}
	ev.Pod = l.pod
	for f := range l.mask {
		switch f {
		case "sub":
			ev.Sub = l.hash(ev.Sub)
		case "client_id":
			ev.ClientID = l.hash(ev.ClientID)
		case "issuer":
			ev.Issuer = l.hash(ev.Issuer)
		case "route":
			ev.Route = l.hash(ev.Route)
		case "request.host":
			ev.Request.Host = l.hash(ev.Request.Host)
		case "request.path":
			ev.Request.Path = l.hash(ev.Request.Path)
		}
	}
	select {
	case l.events <- ev:
	default:
		l.BufferFull.Add(1)
	}
}

// hash is the masked form of v: "hmac:" and 16 bytes of HMAC-SHA256 in hex.
func (l *Logger) hash(v string) string {
	if v == "" {
		return ""
	}
	m := hmac.New(sha256.New, l.key)
	m.Write([]byte(v))
	return "hmac:" + hex.EncodeToString(m.Sum(nil)[:16])
}

// record is ev as an OpenTelemetry log record.
func record(ev authz.DecisionEvent) otellog.Record {
	var r otellog.Record
	r.SetTimestamp(ev.Time)
	r.SetSeverity(otellog.SeverityInfo)
	r.SetBody(attribute.StringValue("decision " + ev.Decision))
	b, _ := json.Marshal(ev)
	var m map[string]any
	_ = json.Unmarshal(b, &m)
	for k, v := range m {
		switch v := v.(type) {
		case string:
			r.AddAttributes(attribute.String(k, v))
		case bool:
			r.AddAttributes(attribute.Bool(k, v))
		case float64:
			r.AddAttributes(attribute.Float64(k, v))
		default:
			j, _ := json.Marshal(v)
			r.AddAttributes(attribute.String(k, strings.TrimSpace(string(j))))
		}
	}
	return r
}

var _ authz.DecisionLogger = (*Logger)(nil)
