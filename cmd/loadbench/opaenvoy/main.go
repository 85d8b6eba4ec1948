// Command opaenvoy is the load script's stand-in for OPA-Envoy: an
// ext_authz Check server that decides as opa-envoy-plugin does, with OPA's
// own Go SDK. The plugin itself is not on the module proxy this project
// builds from, so its request path is rebuilt here from its source
// (envoyauth.RequestToInput and the gRPC server's Check): the CheckRequest
// as protojson, decoded into the input document with the parsed path, the
// prepared query data.envoy.authz.allow evaluated on it, OK or
// PERMISSION_DENIED. The policy verifies the bearer token as an OPA user
// would, with io.jwt.decode_verify against the issuer's JWKS (-jwks), and
// checks iss, aud and the read scope. It is its own module so that the
// project's build and tests never compile OPA.
package main

import (
	"context"
	"encoding/json"
	"flag"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"

	authv3 "github.com/envoyproxy/go-control-plane/envoy/service/auth/v3"
	"github.com/open-policy-agent/opa/v1/ast"
	"github.com/open-policy-agent/opa/v1/rego"
	"github.com/open-policy-agent/opa/v1/storage/inmem"
	"google.golang.org/genproto/googleapis/rpc/code"
	"google.golang.org/genproto/googleapis/rpc/status"
	"google.golang.org/grpc"
	"google.golang.org/grpc/reflection"
	"google.golang.org/protobuf/encoding/protojson"
)

const policy = `package envoy.authz

default allow := false

allow if {
	[valid, _, payload] := io.jwt.decode_verify(bearer, {"cert": data.jwks, "iss": "https://bench.example", "aud": "api"})
	valid
	"read" in split(payload.scope, " ")
}

bearer := t if {
	v := input.attributes.request.http.headers.authorization
	startswith(v, "Bearer ")
	t := substring(v, count("Bearer "), -1)
}
`

type server struct {
	authv3.UnimplementedAuthorizationServer
	query rego.PreparedEvalQuery
}

var (
	allowed = &authv3.CheckResponse{Status: &status.Status{}, HttpResponse: &authv3.CheckResponse_OkResponse{OkResponse: &authv3.OkHttpResponse{}}}
	denied  = &authv3.CheckResponse{Status: &status.Status{Code: int32(code.Code_PERMISSION_DENIED)}}
)

func (s *server) Check(ctx context.Context, req *authv3.CheckRequest) (*authv3.CheckResponse, error) {
	// As envoyauth.RequestToInput: the request as protojson, then a map.
	b, err := protojson.Marshal(req)
	if err != nil {
		return nil, err
	}
	var input map[string]any
	if err := json.Unmarshal(b, &input); err != nil {
		return nil, err
	}
	path := req.GetAttributes().GetRequest().GetHttp().GetPath()
	if i := strings.IndexAny(path, "?#"); i >= 0 {
		path = path[:i]
	}
	parsed := []any{}
	for _, p := range strings.Split(strings.TrimLeft(path, "/"), "/") {
		parsed = append(parsed, p)
	}
	input["parsed_path"] = parsed
	v, err := ast.InterfaceToValue(input)
	if err != nil {
		return nil, err
	}
	rs, err := s.query.Eval(ctx, rego.EvalParsedInput(v))
	if err != nil {
		return nil, err
	}
	if len(rs) == 1 && len(rs[0].Expressions) == 1 && rs[0].Expressions[0].Value == true {
		return allowed, nil
	}
	return denied, nil
}

func main() {
	jwksFile := flag.String("jwks", "", "the issuer's JWKS (file)")
	flag.Parse()
	if err := run(*jwksFile); err != nil {
		fmt.Fprintln(os.Stderr, "opaenvoy:", err)
		os.Exit(1)
	}
}

func run(jwksFile string) error {
	jwks, err := os.ReadFile(jwksFile)
	if err != nil {
		return err
	}
	ctx := context.Background()
	q, err := rego.New(rego.Query("data.envoy.authz.allow"), rego.Module("policy.rego", policy),
		rego.Store(inmem.NewFromObject(map[string]any{"jwks": string(jwks)}))).PrepareForEval(ctx)
	if err != nil {
		return err
	}
	lis, err := net.Listen("tcp", "127.0.0.1:0")
	if err != nil {
		return err
	}
	// The load script reads the port from here.
	fmt.Println(lis.Addr().String())
	gs := grpc.NewServer(grpc.NumStreamWorkers(uint32(max(64, 16*runtime.GOMAXPROCS(0)))))
	authv3.RegisterAuthorizationServer(gs, &server{query: q})
	reflection.Register(gs)
	return gs.Serve(lis)
}
