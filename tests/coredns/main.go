// Command coredns is CoreDNS, unchanged, with only the plugins that weft's tests
// on real nodes use: a cluster DNS like kubeadm's, without metrics.
// scripts/kube.sh builds it and puts it in the localhost/weft-test/coredns image.
package main

import (
	"github.com/coredns/coredns/core/dnsserver"
	"github.com/coredns/coredns/coremain"

	_ "github.com/coredns/coredns/plugin/cache"
	_ "github.com/coredns/coredns/plugin/errors"
	_ "github.com/coredns/coredns/plugin/forward"
	_ "github.com/coredns/coredns/plugin/health"
	_ "github.com/coredns/coredns/plugin/kubernetes"
	_ "github.com/coredns/coredns/plugin/loadbalance"
	_ "github.com/coredns/coredns/plugin/log"
	_ "github.com/coredns/coredns/plugin/loop"
	_ "github.com/coredns/coredns/plugin/ready"
	_ "github.com/coredns/coredns/plugin/reload"
)

// directives are the plugins above in CoreDNS's own order (plugin.cfg, the
// order in which a query passes them): each sees what those after it do.
var directives = []string{
	"reload",
	"ready",
	"health",
	"errors",
	"log",
	"loadbalance",
	"cache",
	"kubernetes",
	"loop",
	"forward",
}

func init() {
	// Read when the server starts, after every init: a Corefile that names
	// any other plugin is rejected.
	dnsserver.Directives = directives
}

func main() {
	coremain.Run()
}
