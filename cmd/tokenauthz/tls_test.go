package main

import (
	"context"
	"crypto/ecdsa"
	"crypto/elliptic"
	"crypto/rand"
	"crypto/tls"
	"crypto/x509"
	"crypto/x509/pkix"
	"encoding/pem"
	"fmt"
	"math/big"
	"net"
	"os"
	"path/filepath"
	"testing"
	"time"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"google.golang.org/grpc"
	"google.golang.org/grpc/credentials"
	"google.golang.org/grpc/credentials/insecure"
)

type testCA struct {
	cert *x509.Certificate
	key  *ecdsa.PrivateKey
	pem  []byte
}

func newTestCA(t *testing.T) *testCA {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(1), Subject: pkix.Name{CommonName: "test CA"}, IsCA: true,
		BasicConstraintsValid: true, KeyUsage: x509.KeyUsageCertSign, NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, tmpl, &key.PublicKey, key)
	if err != nil {
		t.Fatal(err)
	}
	cert, _ := x509.ParseCertificate(der)
	return &testCA{cert: cert, key: key, pem: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der})}
}

// issue writes a leaf certificate and key signed by the CA into dir.
func (ca *testCA) issue(t *testing.T, dir, name string, serial int64, usage x509.ExtKeyUsage) (certFile, keyFile string) {
	t.Helper()
	key, _ := ecdsa.GenerateKey(elliptic.P256(), rand.Reader)
	tmpl := &x509.Certificate{SerialNumber: big.NewInt(serial), Subject: pkix.Name{CommonName: name},
		DNSNames: []string{"localhost"}, IPAddresses: []net.IP{net.ParseIP("127.0.0.1")},
		ExtKeyUsage: []x509.ExtKeyUsage{usage}, KeyUsage: x509.KeyUsageDigitalSignature,
		NotBefore: time.Now().Add(-time.Hour), NotAfter: time.Now().Add(time.Hour)}
	der, err := x509.CreateCertificate(rand.Reader, tmpl, ca.cert, &key.PublicKey, ca.key)
	if err != nil {
		t.Fatal(err)
	}
	kb, _ := x509.MarshalECPrivateKey(key)
	certFile, keyFile = filepath.Join(dir, name+".crt"), filepath.Join(dir, name+".key")
	// Written to temporary files and renamed, as cert-manager does.
	for f, b := range map[string][]byte{certFile: pem.EncodeToMemory(&pem.Block{Type: "CERTIFICATE", Bytes: der}),
		keyFile: pem.EncodeToMemory(&pem.Block{Type: "EC PRIVATE KEY", Bytes: kb})} {
		if err := os.WriteFile(f+".tmp", b, 0o600); err != nil {
			t.Fatal(err)
		}
		if err := os.Rename(f+".tmp", f); err != nil {
			t.Fatal(err)
		}
	}
	return certFile, keyFile
}

const anonymousOnly = `
issuers:
  - name: main
    issuer: https://idp.example
    audiences: [api]
    algorithms: [ES256]
    jwks: '{"keys":[{"kty":"EC","crv":"P-256","x":"kFGt-JSn-ZyyTgRrHIi-Y0ZT_cB0NJd2YsxRuzkOlL8","y":"UPE4g3n1HIs-IIeSZFWZYlVokZW214ozrSifttwvEMo"}]}'
routes:
  - { name: open, match: { path_prefix: / }, anonymous: true }
`

func serveOn(t *testing.T, lis net.Listener, cfgYAML string) {
	t.Helper()
	cfg, err := parseConfig([]byte(cfgYAML), "test")
	if err != nil {
		t.Fatal(err)
	}
	runService(t, cfg, lis, nil)
}

func checkOver(conn *grpc.ClientConn) error {
	ctx, cancel := context.WithTimeout(context.Background(), 5*time.Second)
	defer cancel()
	resp, err := authv3.NewAuthorizationClient(conn).Check(ctx, &authv3.CheckRequest{Attributes: &authv3.AttributeContext{
		Request: &authv3.AttributeContext_Request{Http: &authv3.AttributeContext_HttpRequest{Method: "GET", Path: "/x", Host: "api"}}}})
	if err == nil && resp.GetStatus().GetCode() != 0 {
		err = fmt.Errorf("denied: %v", resp.GetStatus())
	}
	return err
}

func TestMutualTLSWithCertificateReload(t *testing.T) {
	dir := t.TempDir()
	ca := newTestCA(t)
	caFile := filepath.Join(dir, "ca.crt")
	_ = os.WriteFile(caFile, ca.pem, 0o600)
	srvCert, srvKey := ca.issue(t, dir, "server", 100, x509.ExtKeyUsageServerAuth)
	cliCert, cliKey := ca.issue(t, dir, "client", 200, x509.ExtKeyUsageClientAuth)
	lis, err := listen("127.0.0.1:0")
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, lis, fmt.Sprintf("server: { tls: { cert_file: %s, key_file: %s, client_ca_file: %s } }\n", srvCert, srvKey, caFile)+anonymousOnly)

	pool := x509.NewCertPool()
	pool.AddCert(ca.cert)
	client, _ := tls.LoadX509KeyPair(cliCert, cliKey)
	dial := func(withCert bool) (*grpc.ClientConn, error) {
		c := &tls.Config{RootCAs: pool, ServerName: "127.0.0.1"}
		if withCert {
			c.Certificates = []tls.Certificate{client}
		}
		return grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(credentials.NewTLS(c)))
	}
	conn, _ := dial(true)
	defer conn.Close()
	if err := checkOver(conn); err != nil {
		t.Fatalf("mutual TLS check: %v", err)
	}
	anon, _ := dial(false)
	defer anon.Close()
	if err := checkOver(anon); err == nil {
		t.Fatal("a client without a certificate was served")
	}
	plain, _ := grpc.NewClient(lis.Addr().String(), grpc.WithTransportCredentials(insecure.NewCredentials()))
	defer plain.Close()
	if err := checkOver(plain); err == nil {
		t.Fatal("a plaintext client was served")
	}

	serverSerial := func() int64 {
		c, err := tls.Dial("tcp", lis.Addr().String(), &tls.Config{RootCAs: pool, ServerName: "127.0.0.1",
			Certificates: []tls.Certificate{client}, NextProtos: []string{"h2"}})
		if err != nil {
			t.Fatal(err)
		}
		defer c.Close()
		return c.ConnectionState().PeerCertificates[0].SerialNumber.Int64()
	}
	if s := serverSerial(); s != 100 {
		t.Fatalf("server serial %d", s)
	}
	ca.issue(t, dir, "server", 101, x509.ExtKeyUsageServerAuth) // renewed in place
	waitFor(t, func() bool { return serverSerial() == 101 })
	if err := checkOver(conn); err != nil {
		t.Fatalf("after the renewal: %v", err)
	}
}

func TestUnixSocket(t *testing.T) {
	path := filepath.Join(t.TempDir(), "authz.sock")
	_ = os.WriteFile(path, nil, 0o600) // not a socket: must not be removed…
	if _, err := listen("unix://" + path); err == nil {
		t.Fatal("listen replaced a regular file")
	}
	_ = os.Remove(path)
	lis, err := listen("unix://" + path)
	if err != nil {
		t.Fatal(err)
	}
	serveOn(t, lis, anonymousOnly)
	conn, err := grpc.NewClient("unix://"+path, grpc.WithTransportCredentials(insecure.NewCredentials()))
	if err != nil {
		t.Fatal(err)
	}
	defer conn.Close()
	if err := checkOver(conn); err != nil {
		t.Fatalf("check over the unix socket: %v", err)
	}
}
