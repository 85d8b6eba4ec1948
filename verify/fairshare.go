package verify

import (
	"net/netip"
	"sync"
	"time"

	"golang.org/x/time/rate"
)

// callBudget bounds an endpoint's provider calls per pod and shares them
// fairly by client address. Each client has a bucket of its own, a fraction
// of the whole. A call within the client's share draws on the shared bucket
// down to empty; a call beyond it only while the shared bucket is more than
// half full. So a lone client (or every request through one ingress) can
// still use the whole rate, while under a flood the lower half is kept for
// the clients within their share: one client flooding made-up tokens spends
// its share and the surplus, not everyone's budget.
//
// Many addresses at once (a botnet) can still spend the whole budget; the
// bound then does what it did before: protect the provider.
type callBudget struct {
	total *rate.Limiter
	// perClient is each client's rate and burst; 0 for no per-client bound.
	perClient rate.Limit
	burst     int

	mu      sync.Mutex
	clients map[string]*rate.Limiter
}

// maxClients bounds the buckets held. A sweep first drops buckets that are
// full again, which is lossless: a full bucket is what a new client gets.
// Past it, clients not yet held share one bucket.
const maxClients = 10000

const overflowClient = "\x00overflow"

func newCallBudget(perSecond, perClient int) *callBudget {
	b := &callBudget{total: rate.NewLimiter(rate.Limit(perSecond), perSecond)}
	if perClient > 0 {
		b.perClient, b.burst = rate.Limit(perClient), perClient
		b.clients = map[string]*rate.Limiter{}
	}
	return b
}

// allow takes one call from the budget, or names the bound it is over. A
// request with no known client address is charged to a shared bucket.
func (b *callBudget) allow(client string) (over string) {
	if b.perClient == 0 || b.clientBucket(client).Allow() {
		if !b.total.Allow() {
			return "max_calls_per_second"
		}
		return ""
	}
	if b.total.Tokens() <= float64(b.total.Burst())/2 || !b.total.Allow() {
		return "max_calls_per_client_per_second"
	}
	return ""
}

func (b *callBudget) clientBucket(client string) *rate.Limiter {
	if client == "" {
		client = overflowClient
	}
	client = bucketName(client)
	b.mu.Lock()
	defer b.mu.Unlock()
	if l, ok := b.clients[client]; ok {
		return l
	}
	if len(b.clients) >= maxClients {
		now := time.Now()
		for k, l := range b.clients {
			if l.TokensAt(now) >= float64(b.burst) {
				delete(b.clients, k)
			}
		}
		if len(b.clients) >= maxClients {
			client = overflowClient
			if l, ok := b.clients[client]; ok {
				return l
			}
		}
	}
	l := rate.NewLimiter(b.perClient, b.burst)
	b.clients[client] = l
	return l
}

// bucketName is the bucket a client address is charged to: an IPv6 client
// is its /64 (one host is routinely given a whole /64, and could otherwise
// take a fresh address per request to get a fresh share), an IPv4 client
// its address. Anything else is charged as it is named.
func bucketName(client string) string {
	a, err := netip.ParseAddr(client)
	if err != nil || !a.Is6() || a.Is4In6() {
		return client
	}
	p, _ := a.WithZone("").Prefix(64)
	return p.String()
}
