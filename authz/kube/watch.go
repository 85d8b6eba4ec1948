package kube

import (
	"context"
	"fmt"
	"log/slog"
	"sync"
	"sync/atomic"
	"time"

	apierrors "k8s.io/apimachinery/pkg/api/errors"
	"k8s.io/apimachinery/pkg/api/meta"
	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	"k8s.io/apimachinery/pkg/runtime"
	"k8s.io/apimachinery/pkg/runtime/schema"
	"k8s.io/client-go/dynamic"
	"k8s.io/client-go/dynamic/dynamicinformer"
	"k8s.io/client-go/rest"
	"k8s.io/client-go/tools/cache"
	"k8s.io/client-go/tools/clientcmd"

	"github.com/tokenauthz/tokenauthz/api/v1alpha1"
	"github.com/tokenauthz/tokenauthz/authz"
)

// RestConfig is how a pod reaches the API server: its service account in a
// cluster, else client-go's standard loading rules ($KUBECONFIG, then
// ~/.kube/config), so `tokenauthz serve` on a laptop follows a cluster too.
func RestConfig() (*rest.Config, error) {
	if c, err := rest.InClusterConfig(); err == nil {
		return c, nil
	}
	rules := clientcmd.NewDefaultClientConfigLoadingRules()
	c, err := clientcmd.NewNonInteractiveDeferredLoadingClientConfig(rules, &clientcmd.ConfigOverrides{}).ClientConfig()
	if err != nil {
		return nil, fmt.Errorf("kubernetes: not in a pod, and no kubeconfig: %w", err)
	}
	return c, nil
}

// Watcher follows the resources and applies each change: a Snapshot to the
// core (apply), statuses to the API server.
type Watcher struct {
	dyn   dynamic.Interface
	kc    Config
	log   *slog.Logger
	apply func(*Snapshot)

	mu      sync.Mutex
	file    *authz.Config
	builder *Builder

	stores []storeOf
	kick   chan struct{}
	synced atomic.Bool
	// StatusWrites counts status updates this pod made (for tests and
	// the metric).
	StatusWrites atomic.Int64
	// Builds counts snapshots applied.
	Builds atomic.Int64
}

type storeOf struct {
	gvr      schema.GroupVersionResource
	informer cache.SharedIndexInformer
}

// NewWatcher builds a watcher; file is the file config's decision part,
// replaced by SetFile on reload.
func NewWatcher(dyn dynamic.Interface, kc Config, file *authz.Config, apply func(*Snapshot), log *slog.Logger) *Watcher {
	if log == nil {
		log = slog.New(slog.DiscardHandler)
	}
	return &Watcher{dyn: dyn, kc: kc, log: log, apply: apply, file: file, builder: NewBuilder(), kick: make(chan struct{}, 1)}
}

// SetFile puts a reloaded file config in force: policies are rebuilt
// against it.
func (w *Watcher) SetFile(file *authz.Config) {
	w.mu.Lock()
	w.file = file
	w.mu.Unlock()
	w.poke()
}

func (w *Watcher) poke() {
	select {
	case w.kick <- struct{}{}:
	default:
	}
}

// Synced reports whether the first full list of every resource has been
// applied: pods report ready only after it.
func (w *Watcher) Synced() bool { return w.synced.Load() }

// Run lists and watches until ctx ends. When the API server goes away the
// informers retry by themselves and the last snapshot stays in force.
func (w *Watcher) Run(ctx context.Context) {
	namespaces := []string{metav1.NamespaceAll}
	if !w.kc.Namespaces.All && len(w.kc.Namespaces.Names) > 0 {
		namespaces = w.kc.Namespaces.Names
	}
	var factories []dynamicinformer.DynamicSharedInformerFactory
	add := func(f dynamicinformer.DynamicSharedInformerFactory, gvr schema.GroupVersionResource) {
		inf := f.ForResource(gvr).Informer()
		_, _ = inf.AddEventHandler(cache.ResourceEventHandlerFuncs{
			AddFunc:    func(any) { w.poke() },
			DeleteFunc: func(any) { w.poke() },
			UpdateFunc: func(old, cur any) {
				// Status writes (ours or another pod's) change no spec.
				o, ok1 := old.(*unstructured.Unstructured)
				c, ok2 := cur.(*unstructured.Unstructured)
				if ok1 && ok2 && o.GetGeneration() == c.GetGeneration() && o.GetGeneration() != 0 && o.GetUID() == c.GetUID() {
					return
				}
				w.poke()
			},
		})
		w.stores = append(w.stores, storeOf{gvr: gvr, informer: inf})
	}
	for _, ns := range namespaces {
		f := dynamicinformer.NewFilteredDynamicSharedInformerFactory(w.dyn, 10*time.Minute, ns, nil)
		add(f, v1alpha1.TokenPolicies)
		add(f, v1alpha1.TokenIssuers)
		factories = append(factories, f)
	}
	cf := dynamicinformer.NewFilteredDynamicSharedInformerFactory(w.dyn, 10*time.Minute, metav1.NamespaceAll, nil)
	add(cf, v1alpha1.ClusterTokenIssuers)
	factories = append(factories, cf)
	for _, f := range factories {
		f.Start(ctx.Done())
	}
	synced := make([]cache.InformerSynced, 0, len(w.stores))
	for _, s := range w.stores {
		synced = append(synced, s.informer.HasSynced)
	}
	if !cache.WaitForCacheSync(ctx.Done(), synced...) {
		return
	}
	w.rebuild(ctx)
	w.synced.Store(true)
	w.log.Info("kubernetes policies synced")
	for {
		select {
		case <-ctx.Done():
			return
		case <-w.kick:
			// Let a burst of events (kubectl apply -f dir/) settle.
			select {
			case <-ctx.Done():
				return
			case <-time.After(50 * time.Millisecond):
			}
			w.rebuild(ctx)
		}
	}
}

// objects reads the informers' stores.
func (w *Watcher) objects() (Objects, map[schema.GroupVersionResource]map[string]*unstructured.Unstructured) {
	var objs Objects
	raw := map[schema.GroupVersionResource]map[string]*unstructured.Unstructured{}
	for _, s := range w.stores {
		if raw[s.gvr] == nil {
			raw[s.gvr] = map[string]*unstructured.Unstructured{}
		}
		for _, item := range s.informer.GetStore().List() {
			u, ok := item.(*unstructured.Unstructured)
			if !ok {
				continue
			}
			if ns := u.GetNamespace(); ns != "" && !w.kc.Namespaces.Watched(ns) {
				continue
			}
			raw[s.gvr][u.GetNamespace()+"/"+u.GetName()] = u
			var err error
			switch s.gvr {
			case v1alpha1.TokenPolicies:
				var tp v1alpha1.TokenPolicy
				if err = runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &tp); err == nil {
					objs.Policies = append(objs.Policies, &tp)
				}
			case v1alpha1.TokenIssuers:
				var ti v1alpha1.TokenIssuer
				if err = runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &ti); err == nil {
					objs.Issuers = append(objs.Issuers, &ti)
				}
			case v1alpha1.ClusterTokenIssuers:
				var ci v1alpha1.ClusterTokenIssuer
				if err = runtime.DefaultUnstructuredConverter.FromUnstructured(u.Object, &ci); err == nil {
					objs.ClusterIssuers = append(objs.ClusterIssuers, &ci)
				}
			}
			if err != nil {
				w.log.Warn("a resource does not decode; ignored", "resource", s.gvr.Resource, "name", u.GetNamespace()+"/"+u.GetName(), "error", err.Error())
			}
		}
	}
	return objs, raw
}

func (w *Watcher) rebuild(ctx context.Context) {
	objs, raw := w.objects()
	w.mu.Lock()
	snap := w.builder.Build(w.file, &w.kc, objs)
	w.mu.Unlock()
	w.apply(snap)
	w.Builds.Add(1)
	for _, st := range snap.Status {
		u := raw[st.Resource][st.Namespace+"/"+st.Name]
		if u == nil || u.GetUID() != st.UID {
			continue
		}
		if err := w.writeStatus(ctx, u, st); err != nil && !apierrors.IsConflict(err) && !apierrors.IsNotFound(err) {
			w.log.Warn("status not written; retried on the next change", "resource", st.Resource.Resource,
				"name", st.Namespace+"/"+st.Name, "error", err.Error())
		}
	}
}

// maxMessage bounds a condition's message (the API allows 32 KiB).
const maxMessage = 4000

// writeStatus stores st as u's status when it differs from what u holds,
// with u's resourceVersion: a concurrent write by another pod (or a newer
// spec) makes it a conflict, and the next build decides again.
func (w *Watcher) writeStatus(ctx context.Context, u *unstructured.Unstructured, st ObjectStatus) error {
	var cur v1alpha1.Status
	if m, ok := u.Object["status"].(map[string]any); ok {
		_ = runtime.DefaultUnstructuredConverter.FromUnstructured(m, &cur)
	}
	status := metav1.ConditionFalse
	if st.Accepted {
		status = metav1.ConditionTrue
	}
	msg := st.Message
	if len(msg) > maxMessage {
		msg = msg[:maxMessage] + "…"
	}
	want := metav1.Condition{Type: "Accepted", Status: status, Reason: st.Reason, Message: msg, ObservedGeneration: st.Generation}
	if old := meta.FindStatusCondition(cur.Conditions, "Accepted"); old != nil && cur.ObservedGeneration == st.Generation &&
		old.Status == want.Status && old.Reason == want.Reason && old.Message == want.Message && old.ObservedGeneration == want.ObservedGeneration {
		return nil
	}
	next := v1alpha1.Status{ObservedGeneration: st.Generation, Conditions: cur.Conditions}
	meta.SetStatusCondition(&next.Conditions, want) // keeps lastTransitionTime unless the status flips
	m, err := runtime.DefaultUnstructuredConverter.ToUnstructured(&next)
	if err != nil {
		return err
	}
	obj := u.DeepCopy()
	obj.Object["status"] = m
	res := w.dyn.Resource(st.Resource)
	if st.Namespace != "" {
		_, err = res.Namespace(st.Namespace).UpdateStatus(ctx, obj, metav1.UpdateOptions{})
	} else {
		_, err = res.UpdateStatus(ctx, obj, metav1.UpdateOptions{})
	}
	if err == nil {
		w.StatusWrites.Add(1)
	}
	return err
}
