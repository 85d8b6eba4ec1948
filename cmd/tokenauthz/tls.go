package main

import (
	"crypto/tls"
	"crypto/x509"
	"errors"
	"fmt"
	"log/slog"
	"net"
	"os"
	"strings"
	"sync"
	"time"
)

// tlsConfig is server.tls: TLS on the gRPC port, mutual TLS with a client CA.
type tlsConfig struct {
	CertFile string `yaml:"cert_file"`
	KeyFile  string `yaml:"key_file"`
	// ClientCAFile turns on mutual TLS: clients must present a certificate
	// signed by one of these CAs.
	ClientCAFile string `yaml:"client_ca_file"`
}

func (c *tlsConfig) validate() []string {
	var p []string
	if c.CertFile == "" || c.KeyFile == "" {
		p = append(p, "server.tls.cert_file: cert_file and key_file are both required")
	} else if _, err := tls.LoadX509KeyPair(c.CertFile, c.KeyFile); err != nil {
		p = append(p, "server.tls.cert_file: "+err.Error()+" (with key_file)")
	}
	if c.ClientCAFile != "" {
		if _, err := loadPool(c.ClientCAFile); err != nil {
			p = append(p, "server.tls.client_ca_file: "+err.Error())
		}
	}
	return p
}

func loadPool(file string) (*x509.CertPool, error) {
	pem, err := os.ReadFile(file)
	if err != nil {
		return nil, err
	}
	pool := x509.NewCertPool()
	if !pool.AppendCertsFromPEM(pem) {
		return nil, errors.New("no PEM certificates in " + file)
	}
	return pool, nil
}

// certReloader serves the certificate and client CAs in the files, reading
// them again when they change (cert-manager and Kubernetes Secrets replace
// them in place), at most once a second. A broken new file keeps the last
// good one in use, with a log line.
type certReloader struct {
	cfg tlsConfig
	log *slog.Logger

	mu      sync.Mutex
	checked time.Time
	stamp   string
	cert    *tls.Certificate
	pool    *x509.CertPool
}

func newCertReloader(cfg tlsConfig, log *slog.Logger) (*certReloader, error) {
	r := &certReloader{cfg: cfg, log: log}
	if err := r.load(); err != nil {
		return nil, err
	}
	return r, nil
}

// stamp identifies the files' versions by size and modification time.
func (r *certReloader) fileStamp() string {
	var b strings.Builder
	for _, f := range []string{r.cfg.CertFile, r.cfg.KeyFile, r.cfg.ClientCAFile} {
		if f == "" {
			continue
		}
		if st, err := os.Stat(f); err == nil {
			fmt.Fprintf(&b, "%d.%d;", st.Size(), st.ModTime().UnixNano())
		}
	}
	return b.String()
}

func (r *certReloader) load() error {
	cert, err := tls.LoadX509KeyPair(r.cfg.CertFile, r.cfg.KeyFile)
	if err != nil {
		return err
	}
	var pool *x509.CertPool
	if r.cfg.ClientCAFile != "" {
		if pool, err = loadPool(r.cfg.ClientCAFile); err != nil {
			return err
		}
	}
	r.cert, r.pool, r.stamp = &cert, pool, r.fileStamp()
	return nil
}

// config is the TLS config for one handshake.
func (r *certReloader) config(*tls.ClientHelloInfo) (*tls.Config, error) {
	r.mu.Lock()
	if time.Since(r.checked) >= time.Second {
		r.checked = time.Now()
		if r.fileStamp() != r.stamp {
			if err := r.load(); err != nil {
				r.log.Error("TLS files changed but do not load; the previous ones stay in use", "error", err.Error())
				r.stamp = r.fileStamp() // do not retry on every handshake
			} else {
				r.log.Info("TLS certificate reloaded")
			}
		}
	}
	c := &tls.Config{MinVersion: tls.VersionTLS12, Certificates: []tls.Certificate{*r.cert}, NextProtos: []string{"h2"}}
	if r.pool != nil {
		c.ClientAuth, c.ClientCAs = tls.RequireAndVerifyClientCert, r.pool
	}
	r.mu.Unlock()
	return c, nil
}

// tlsServerConfig is what the gRPC credentials wrap: every handshake asks
// the reloader.
func (r *certReloader) tlsServerConfig() *tls.Config {
	return &tls.Config{MinVersion: tls.VersionTLS12, GetConfigForClient: r.config, NextProtos: []string{"h2"}}
}

// listen opens addr: "unix:///path" (or "unix:/path") for a unix domain
// socket, as a sidecar deployment uses, else a TCP host:port. A stale
// socket file from a previous run is removed first.
func listen(addr string) (net.Listener, error) {
	if path, ok := strings.CutPrefix(addr, "unix://"); ok {
		addr = "unix:" + path
	}
	if path, ok := strings.CutPrefix(addr, "unix:"); ok {
		if st, err := os.Stat(path); err == nil && st.Mode()&os.ModeSocket != 0 {
			_ = os.Remove(path)
		}
		return net.Listen("unix", path)
	}
	return net.Listen("tcp", addr)
}
