//go:build race

package authz_test

// raceEnabled: the race detector changes allocation counts, so the
// allocation budgets run without it (.ci/run runs them so).
const raceEnabled = true
