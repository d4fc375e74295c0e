// Command trainer-local runs the Kubeflow Trainer v2 controller manager (TrainJob, TrainingRuntime and
// ClusterTrainingRuntime controllers and their validating webhooks) out of cluster for tests.
//
// The stock cmd/trainer-controller-manager always rotates its own webhook certificate
// (open-policy-agent/cert-controller): it writes a Secret in namespace kubeflow-system, patches the
// ValidatingWebhookConfiguration "validator.trainer.kubeflow.org", keeps the certificate in the fixed
// /tmp/k8s-webhook-server/serving-certs and binds its webhook server on every interface. Tests must
// only listen on 127.0.0.1 and run side by side, so this entry point wires the same controller,
// runtime and webhook packages with every listener on a chosen host and the serving certificate
// taken from a directory the test harness generates (no rotation). See docs/cluster-harness.md.
package main

import (
	"flag"
	"os"

	apiruntime "k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	"sigs.k8s.io/controller-runtime/pkg/client"
	ctrlpkg "sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	metricsserver "sigs.k8s.io/controller-runtime/pkg/metrics/server"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	jobsetv1alpha2 "sigs.k8s.io/jobset/api/jobset/v1alpha2"
	schedulerpluginsv1alpha1 "sigs.k8s.io/scheduler-plugins/apis/scheduling/v1alpha1"

	trainer "github.com/kubeflow/trainer/v2/pkg/apis/trainer/v1alpha1"
	"github.com/kubeflow/trainer/v2/pkg/controller"
	runtimecore "github.com/kubeflow/trainer/v2/pkg/runtime/core"
	"github.com/kubeflow/trainer/v2/pkg/webhooks"
)

func main() {
	host := flag.String("bind-host", "127.0.0.1", "Address the webhook server binds to.")
	webhookPort := flag.Int("webhook-server-port", 0, "Webhook port on --bind-host.")
	certDir := flag.String("cert-dir", "", "Directory with tls.crt and tls.key for the webhook.")
	probeAddr := flag.String("health-probe-bind-address", "127.0.0.1:0", "Health/ready probe address.")
	metricsAddr := flag.String("metrics-bind-address", "0", "Metrics address (plain HTTP); 0 disables it.")
	opts := zap.Options{Development: true}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")

	scheme := apiruntime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(trainer.AddToScheme(scheme))
	utilruntime.Must(jobsetv1alpha2.AddToScheme(scheme))
	utilruntime.Must(schedulerpluginsv1alpha1.AddToScheme(scheme))

	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), ctrl.Options{
		Scheme: scheme,
		// As the stock binary: runtimes read JobSets and PodGroups as unstructured objects too.
		Client:                 client.Options{Cache: &client.CacheOptions{Unstructured: true}},
		Metrics:                metricsserver.Options{BindAddress: *metricsAddr},
		HealthProbeBindAddress: *probeAddr,
		WebhookServer:          webhook.NewServer(webhook.Options{Host: *host, Port: *webhookPort, CertDir: *certDir}),
	})
	if err != nil {
		log.Error(err, "unable to create manager")
		os.Exit(1)
	}
	ctx := ctrl.SetupSignalHandler()
	runtimes, err := runtimecore.New(ctx, mgr.GetClient(), mgr.GetFieldIndexer())
	if err != nil {
		log.Error(err, "unable to initialize runtimes")
		os.Exit(1)
	}
	if name, err := controller.SetupControllers(mgr, runtimes, ctrlpkg.Options{}); err != nil {
		log.Error(err, "unable to create controller", "controller", name)
		os.Exit(1)
	}
	if name, err := webhooks.Setup(mgr, runtimes); err != nil {
		log.Error(err, "unable to create webhook", "webhook", name)
		os.Exit(1)
	}
	utilruntime.Must(mgr.AddHealthzCheck("healthz", healthz.Ping))
	utilruntime.Must(mgr.AddReadyzCheck("webhook", mgr.GetWebhookServer().StartedChecker()))
	log.Info("starting manager")
	if err := mgr.Start(ctx); err != nil {
		log.Error(err, "manager stopped")
		os.Exit(1)
	}
}
