{{- define "wrpo-operator.fullname" -}}
{{- if contains .Chart.Name .Release.Name -}}
{{- .Release.Name | trunc 63 | trimSuffix "-" -}}
{{- else -}}
{{- printf "%s-%s" .Release.Name .Chart.Name | trunc 63 | trimSuffix "-" -}}
{{- end -}}
{{- end -}}

{{- define "wrpo-operator.labels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
app.kubernetes.io/version: {{ .Chart.AppVersion | quote }}
app.kubernetes.io/managed-by: {{ .Release.Service }}
app.kubernetes.io/part-of: wrpo
helm.sh/chart: {{ printf "%s-%s" .Chart.Name .Chart.Version }}
{{- end -}}

{{- define "wrpo-operator.selectorLabels" -}}
app.kubernetes.io/name: {{ .Chart.Name }}
app.kubernetes.io/instance: {{ .Release.Name }}
{{- end -}}

{{- define "wrpo-operator.serviceAccountName" -}}
{{- default (include "wrpo-operator.fullname" .) .Values.serviceAccount.name -}}
{{- end -}}

{{- define "wrpo-operator.namespaces" -}}
{{- if .Values.watchNamespaces -}}
{{- toJson .Values.watchNamespaces -}}
{{- else -}}
{{- toJson (list .Release.Namespace) -}}
{{- end -}}
{{- end -}}

{{/* The rules of the operator's Role or ClusterRole: exactly what it watches and writes. */}}
{{- define "wrpo-operator.rules" -}}
- apiGroups: [fusion.wrpo.io]
  resources: [fusionruns]
  verbs: [get, list, watch, patch, delete]
- apiGroups: [fusion.wrpo.io]
  resources: [fusionruns/status]
  verbs: [get, patch]
# Children are created with blockOwnerDeletion: OwnerReferencesPermissionEnforcement (OpenShift) requires
# update on the owner's finalizers subresource for that.
- apiGroups: [fusion.wrpo.io]
  resources: [fusionruns/finalizers]
  verbs: [update]
- apiGroups: [""]
  resources: [configmaps, services, persistentvolumeclaims]
  verbs: [get, list, watch, create, patch, delete]
# Pods are only read: why a stage stalls (image pulls, crash loops, scheduling).
- apiGroups: [""]
  resources: [pods]
  verbs: [get, list, watch]
- apiGroups: [apps]
  resources: [deployments]
  verbs: [get, list, watch, create, patch, delete]
- apiGroups: [batch]
  resources: [jobs]
  verbs: [get, list, watch, create, patch, delete]
{{- if has "pytorchjob" .Values.rbac.trainingBackends }}
- apiGroups: [kubeflow.org]
  resources: [pytorchjobs]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
{{- if has "trainjob" .Values.rbac.trainingBackends }}
# Trainer v2: a TrainingRuntime per training stage and the TrainJob naming it (their JobSets are Trainer's;
# the Jobs JobSet makes carry the run's label and are read through the jobs rule above: stalls).
- apiGroups: [trainer.kubeflow.org]
  resources: [trainjobs, trainingruntimes]
  verbs: [get, list, watch, create, patch, delete]
{{- end }}
# Kueue's Workloads are only read: why Kueue holds a child (docs/operator.md, "Kueue"); none without Kueue.
- apiGroups: [kueue.x-k8s.io]
  resources: [workloads]
  verbs: [get, list, watch]
# Events: posted on FusionRuns; Warning Events on its Jobs, TrainJobs and JobSet's Jobs are read (refused
# pod creations).
- apiGroups: [""]
  resources: [events]
  verbs: [get, list, watch, create, patch]
- apiGroups: [events.k8s.io]
  resources: [events]
  verbs: [create, patch]
{{- end -}}
