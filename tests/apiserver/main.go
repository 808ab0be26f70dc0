// Command kube-apiserver is the upstream Kubernetes API server, unchanged, built
// as a dependency so that weft's tests run against a real one.
package main

import (
	"os"

	"k8s.io/kubernetes/cmd/kube-apiserver/app"
)

func main() {
	if err := app.NewAPIServerCommand().Execute(); err != nil {
		os.Exit(1)
	}
}
