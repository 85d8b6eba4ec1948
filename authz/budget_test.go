package authz_test

import (
	"testing"

	"github.com/tokenauthz/tokenauthz/verify"
)

// TestAllocationBudgets holds the hot paths to their allocation counts
// (deterministic, unlike time): a change that adds an allocation to a
// warm check, a warm check with three CEL conditions and two CEL headers,
// a DPoP check, or a check of a token never seen before fails here and
// says how many it added. Lower the budget when a change saves some.
func TestAllocationBudgets(t *testing.T) {
	if raceEnabled {
		t.Skip("the race detector changes allocation counts: .ci/run runs this without -race")
	}
	if testing.Short() {
		t.Skip("runs four benchmarks")
	}
	for _, b := range []struct {
		name   string
		budget int64
		fn     func(*testing.B)
	}{
		{"warm check", 11, BenchmarkCheckWarm},
		{"warm check, 3 CEL conditions and 2 CEL headers", 28, BenchmarkCheckWarmCEL},
		{"DPoP check (fresh proof)", 58, BenchmarkCheckDPoP},
		{"token never seen (RS256)", 25, func(b *testing.B) { coldRS256(b) }},
	} {
		r := testing.Benchmark(b.fn)
		if r.N == 0 {
			t.Fatalf("%s: the benchmark did not run", b.name)
		}
		switch got := r.AllocsPerOp(); {
		case got > b.budget:
			t.Errorf("%s: %d allocations a check, budget %d: the change adds %d", b.name, got, b.budget, got-b.budget)
		case got < b.budget:
			t.Logf("%s: %d allocations a check, under the budget of %d: lower it", b.name, got, b.budget)
		}
	}
}

// coldRS256 is BenchmarkCheckCold's RS256 case: every check verifies the
// signature (the verified-token cache is off).
func coldRS256(b *testing.B) {
	srv, k, idp := benchServer(b, "RS256", verify.Options{VerifiedTokens: verify.VerifiedCacheOptions{Disabled: true}})
	runChecks(b, srv, req{headers: bearer(benchToken(b, k, idp))}.proto())
}
