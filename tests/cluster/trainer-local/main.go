// Command trainer-local runs the Kubeflow Trainer v2 controller manager (TrainJob, TrainingRuntime and
// ClusterTrainingRuntime controllers, their defaulting and validating webhooks) out of cluster for tests.
//
// It reads the stock Configuration file (config.trainer.kubeflow.org/v1alpha1, --config) exactly as
// cmd/trainer-controller-manager does, with two differences that let tests run side by side on
// 127.0.0.1: the webhook server's certificate comes from --cert-dir (the stock binary keeps it in the
// fixed /tmp/k8s-webhook-server/serving-certs), and certificate management must be off (the stock
// rotation writes a Secret in kubeflow-system and patches the webhook configurations). The TrainJob
// status server (feature gate TrainJobStatus, off by default) listens on every interface, so it is
// refused. See docs/cluster-harness.md.
package main

import (
	"flag"
	"os"

	apiruntime "k8s.io/apimachinery/pkg/runtime"
	utilruntime "k8s.io/apimachinery/pkg/util/runtime"
	utilfeature "k8s.io/apiserver/pkg/util/feature"
	clientgoscheme "k8s.io/client-go/kubernetes/scheme"
	ctrl "sigs.k8s.io/controller-runtime"
	ctrlpkg "sigs.k8s.io/controller-runtime/pkg/controller"
	"sigs.k8s.io/controller-runtime/pkg/healthz"
	"sigs.k8s.io/controller-runtime/pkg/log/zap"
	"sigs.k8s.io/controller-runtime/pkg/webhook"
	jobsetv1alpha2 "sigs.k8s.io/jobset/api/jobset/v1alpha2"
	schedulerpluginsv1alpha1 "sigs.k8s.io/scheduler-plugins/apis/scheduling/v1alpha1"
	volcanov1beta1 "volcano.sh/apis/pkg/apis/scheduling/v1beta1"

	configapi "github.com/kubeflow/trainer/v2/pkg/apis/config/v1alpha1"
	trainer "github.com/kubeflow/trainer/v2/pkg/apis/trainer/v1alpha1"
	"github.com/kubeflow/trainer/v2/pkg/config"
	"github.com/kubeflow/trainer/v2/pkg/controller"
	"github.com/kubeflow/trainer/v2/pkg/features"
	runtimecore "github.com/kubeflow/trainer/v2/pkg/runtime/core"
	"github.com/kubeflow/trainer/v2/pkg/webhooks"
)

func main() {
	configFile := flag.String("config", "", "The stock Configuration file (config.trainer.kubeflow.org/v1alpha1).")
	certDir := flag.String("cert-dir", "", "Directory with tls.crt and tls.key for the webhook server.")
	opts := zap.Options{Development: true}
	opts.BindFlags(flag.CommandLine)
	flag.Parse()
	ctrl.SetLogger(zap.New(zap.UseFlagOptions(&opts)))
	log := ctrl.Log.WithName("setup")
	fail := func(err error, msg string, kv ...any) {
		log.Error(err, msg, kv...)
		os.Exit(1)
	}

	scheme := apiruntime.NewScheme()
	utilruntime.Must(clientgoscheme.AddToScheme(scheme))
	utilruntime.Must(configapi.AddToScheme(scheme))
	utilruntime.Must(trainer.AddToScheme(scheme))
	utilruntime.Must(jobsetv1alpha2.AddToScheme(scheme))
	utilruntime.Must(schedulerpluginsv1alpha1.AddToScheme(scheme))
	utilruntime.Must(volcanov1beta1.AddToScheme(scheme))

	if *configFile == "" || *certDir == "" {
		fail(nil, "--config and --cert-dir are required")
	}
	options, cfg, err := config.Load(scheme, *configFile, false)
	if err != nil {
		fail(err, "unable to load the configuration", "file", *configFile)
	}
	if config.IsCertManagementEnabled(&cfg) {
		fail(nil, "set certManagement.enable: false (the certificate comes from --cert-dir)")
	}
	if err := utilfeature.DefaultMutableFeatureGate.SetFromMap(cfg.FeatureGates); err != nil {
		fail(err, "unable to set feature gates")
	}
	if features.Enabled(features.TrainJobStatus) {
		fail(nil, "feature gate TrainJobStatus is not supported (its server binds every interface)")
	}
	// The stock options with the webhook server's certificate directory set.
	host := ""
	if cfg.Webhook.Host != nil {
		host = *cfg.Webhook.Host
	}
	options.WebhookServer = webhook.NewServer(webhook.Options{Host: host, Port: int(*cfg.Webhook.Port), CertDir: *certDir})

	mgr, err := ctrl.NewManager(ctrl.GetConfigOrDie(), options)
	if err != nil {
		fail(err, "unable to create manager")
	}
	ctx := ctrl.SetupSignalHandler()
	runtimes, err := runtimecore.New(ctx, mgr.GetClient(), mgr.GetFieldIndexer(), &cfg)
	if err != nil {
		fail(err, "unable to initialize runtimes")
	}
	if name, err := controller.SetupControllers(mgr, runtimes, ctrlpkg.Options{}); err != nil {
		fail(err, "unable to create controller", "controller", name)
	}
	if name, err := webhooks.Setup(mgr, runtimes); err != nil {
		fail(err, "unable to create webhook", "webhook", name)
	}
	utilruntime.Must(mgr.AddHealthzCheck(cfg.Health.LivenessEndpointName, healthz.Ping))
	utilruntime.Must(mgr.AddReadyzCheck(cfg.Health.ReadinessEndpointName, mgr.GetWebhookServer().StartedChecker()))
	log.Info("starting manager")
	if err := mgr.Start(ctx); err != nil {
		fail(err, "manager stopped")
	}
}
