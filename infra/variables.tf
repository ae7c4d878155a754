variable "project_id" {
  type        = string
  description = "GCP project that holds the VM, the bucket and the service account."
}

variable "region" {
  type        = string
  default     = "us-central1"
  description = "Region of the subnet, the Cloud Router/NAT and (by default) the bucket."
}

variable "zone" {
  type        = string
  default     = "us-central1-a"
  description = "Zone of the VM; it must offer G2 machines with NVIDIA L4 GPUs (gcloud compute accelerator-types list --filter=name=nvidia-l4)."
}

variable "name" {
  type        = string
  default     = "sdtune"
  description = "Prefix of every resource name. 3-27 characters, so that the service account id \"<name>-vm\" has the 6-30 Google requires."

  validation {
    condition     = can(regex("^[a-z][a-z0-9-]{1,25}[a-z0-9]$", var.name))
    error_message = "name: 3-27 characters (the service account id \"<name>-vm\" must be 6-30), lowercase letters, digits and '-', starting with a letter and not ending with '-'."
  }
}

variable "machine_type" {
  type        = string
  default     = "g2-standard-8"
  description = <<-EOT
    G2 machine type. The L4 count is fixed by the type: g2-standard-4/8/12/16/32 have 1 L4 (24 GB),
    g2-standard-24 has 2, g2-standard-48 has 4, g2-standard-96 has 8. Set gpu_count to match
    (multi-GPU training: accelerate/torchrun with one process per GPU).
  EOT

  validation {
    condition     = contains(["g2-standard-4", "g2-standard-8", "g2-standard-12", "g2-standard-16", "g2-standard-24", "g2-standard-32", "g2-standard-48", "g2-standard-96"], var.machine_type)
    error_message = "machine_type: one of g2-standard-4, -8, -12, -16, -24, -32, -48, -96."
  }
}

variable "gpu_count" {
  type        = number
  default     = 1
  description = "Number of NVIDIA L4 GPUs; must match machine_type (1; 2 for g2-standard-24; 4 for -48; 8 for -96)."

  validation {
    condition     = contains([1, 2, 4, 8], var.gpu_count)
    error_message = "gpu_count: 1, 2, 4 or 8."
  }
}

variable "spot" {
  type        = bool
  default     = false
  description = "Run as a Spot VM (much cheaper, may be stopped at any time; DVC checkpoints make train resumable)."
}

variable "image_project" {
  type        = string
  default     = "deeplearning-platform-release"
  description = "Project of the boot image family (Google's Deep Learning VM images)."
}

variable "image_family" {
  type        = string
  default     = "common-cu128-ubuntu-2204-nvidia-570"
  description = "Deep Learning VM image family with the NVIDIA driver (list: gcloud compute images list --project deeplearning-platform-release --filter='family~nvidia'). Its CUDA must be >= the image's (docker/Dockerfile BASE_IMAGE, CUDA 12.8)."
}

variable "secure_boot" {
  type        = bool
  default     = true
  description = "Shielded VM Secure Boot, which loads only signed kernel modules. If the image's NVIDIA driver is unsigned, nvidia-smi fails and the startup script stops with an error (journal and /etc/motd): set this to false for such an image (or pick an image_family whose driver is signed)."
}

variable "boot_disk_size_gb" {
  type        = number
  default     = 200
  description = "Boot disk size in GB: the OS image, the docker image (~10 GB), model caches and DVC's cache."

  validation {
    condition     = var.boot_disk_size_gb >= 100
    error_message = "boot_disk_size_gb: at least 100 (the Deep Learning VM image alone takes ~50 GB)."
  }
}

variable "boot_disk_type" {
  type        = string
  default     = "pd-balanced"
  description = "Boot disk type (pd-balanced or pd-ssd on G2)."
}

variable "repo_url" {
  type        = string
  description = "Git URL of the sdtune repository the startup script clones and builds the image from (https; a public repo or one the VM can reach)."
}

variable "repo_ref" {
  type        = string
  default     = "main"
  description = "Branch, tag or commit of repo_url to build the image from, at the first boot and when this changes (not when a branch moves); a tag or commit pins the library versions."
}

variable "bucket_name" {
  type        = string
  default     = ""
  description = "Name of the DVC remote bucket; empty means \"<project_id>-<name>-dvc\"."
}

variable "bucket_location" {
  type        = string
  default     = "US-CENTRAL1"
  description = "Bucket location; keep it in the VM's region to avoid egress charges."
}

variable "noncurrent_version_days" {
  type        = number
  default     = 30
  description = "Days an overwritten or deleted object version is kept before it is removed (versioning is on)."
}

variable "subnet_cidr" {
  type        = string
  default     = "10.42.0.0/24"
  description = "IPv4 range of the VM's subnet."
}

variable "ssh_members" {
  type        = list(string)
  default     = []
  description = "Principals (\"user:a@example.com\", \"group:...\") allowed to SSH through IAP: granted IAP tunnel access and OS Admin Login on this VM, Service Account User on the VM's service account (OS Login needs it), Compute Viewer on the project (gcloud compute ssh reads the instance) and read access to the bucket's objects (dvc pull elsewhere)."
}

variable "labels" {
  type        = map(string)
  default     = {}
  description = "Extra labels on the VM and the bucket."
}
