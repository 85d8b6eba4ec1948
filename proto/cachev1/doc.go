// Package cachev1 holds the protobuf messages tokenauthz pods share through
// Redis (cache.proto); cache.pb.go is generated from it.
package cachev1

//go:generate protoc -I.. --go_out=.. --go_opt=paths=source_relative cachev1/cache.proto
