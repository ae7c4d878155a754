# One G2 VM with NVIDIA L4 GPU(s), reachable only through IAP, a versioned private bucket for the DVC
# remote, and a service account that can touch the objects of that bucket and nothing else.

locals {
  bucket_name = var.bucket_name != "" ? var.bucket_name : "${var.project_id}-${var.name}-dvc"
  labels      = merge({ app = "sdtune" }, var.labels)
  # L4s per G2 machine type (fixed by Google; the instance's precondition checks gpu_count against it).
  l4_per_type = {
    "g2-standard-4"  = 1
    "g2-standard-8"  = 1
    "g2-standard-12" = 1
    "g2-standard-16" = 1
    "g2-standard-32" = 1
    "g2-standard-24" = 2
    "g2-standard-48" = 4
    "g2-standard-96" = 8
  }
}

resource "google_project_service" "apis" {
  # iam: the VM's service account; cloudresourcemanager: the project-level IAM bindings (a new
  # project has neither on, and apply failed creating the account with SERVICE_DISABLED).
  for_each = toset(["cloudresourcemanager.googleapis.com", "compute.googleapis.com", "iam.googleapis.com",
  "iap.googleapis.com", "oslogin.googleapis.com", "storage.googleapis.com"])
  service            = each.value
  disable_on_destroy = false
}

# --- network: private subnet, egress through Cloud NAT, SSH from IAP only -----------------------

resource "google_compute_network" "vpc" {
  name                    = "${var.name}-vpc"
  auto_create_subnetworks = false
  depends_on              = [google_project_service.apis]
}

resource "google_compute_subnetwork" "subnet" {
  name                     = "${var.name}-subnet"
  region                   = var.region
  network                  = google_compute_network.vpc.id
  ip_cidr_range            = var.subnet_cidr
  private_ip_google_access = true # GCS and other Google APIs without a public IP

  log_config {
    aggregation_interval = "INTERVAL_10_MIN"
    flow_sampling        = 0.5
    metadata             = "INCLUDE_ALL_METADATA"
  }
}

resource "google_compute_router" "router" {
  name    = "${var.name}-router"
  region  = var.region
  network = google_compute_network.vpc.id
}

resource "google_compute_router_nat" "nat" {
  name                               = "${var.name}-nat"
  router                             = google_compute_router.router.name
  region                             = var.region
  nat_ip_allocate_option             = "AUTO_ONLY"
  source_subnetwork_ip_ranges_to_nat = "LIST_OF_SUBNETWORKS"

  subnetwork {
    name                    = google_compute_subnetwork.subnet.id
    source_ip_ranges_to_nat = ["ALL_IP_RANGES"]
  }

  log_config {
    enable = true
    filter = "ERRORS_ONLY"
  }
}

resource "google_compute_firewall" "iap_ssh" {
  name      = "${var.name}-allow-iap-ssh"
  network   = google_compute_network.vpc.id
  direction = "INGRESS"
  priority  = 1000

  # Google's IAP TCP forwarding range: the only source allowed to reach port 22.
  source_ranges           = ["35.235.240.0/20"]
  target_service_accounts = [google_service_account.vm.email]

  allow {
    protocol = "tcp"
    ports    = ["22"]
  }

  log_config {
    metadata = "INCLUDE_ALL_METADATA"
  }
}

# --- identity: a dedicated service account, bucket-scoped ---------------------------------------

resource "google_service_account" "vm" {
  account_id   = "${var.name}-vm"
  display_name = "sdtune VM (DVC remote objects only)"
  depends_on   = [google_project_service.apis]
}

# --- storage: the DVC remote -------------------------------------------------------------------

resource "google_storage_bucket" "dvc" {
  #checkov:skip=CKV_GCP_62:Access is recorded by Cloud Audit Logs (Data Access logs for GCS); legacy usage logs would need a second bucket that itself fails this check.
  name                        = local.bucket_name
  location                    = var.bucket_location
  storage_class               = "STANDARD"
  uniform_bucket_level_access = true
  public_access_prevention    = "enforced"
  force_destroy               = false
  labels                      = local.labels

  versioning {
    enabled = true
  }

  # DVC's content-addressed objects never change; versions only pile up from `dvc gc -c` and
  # overwrites, so old versions expire after a while.
  lifecycle_rule {
    condition {
      days_since_noncurrent_time = var.noncurrent_version_days
      with_state                 = "ARCHIVED"
    }
    action {
      type = "Delete"
    }
  }

  depends_on = [google_project_service.apis]
}

# Bucket-level, not project-level: the VM can list, read, write and delete objects of this bucket
# (what dvc push/pull/gc need) and nothing else in the project.
resource "google_storage_bucket_iam_member" "vm_objects" {
  bucket = google_storage_bucket.dvc.name
  role   = "roles/storage.objectUser"
  member = "serviceAccount:${google_service_account.vm.email}"
}

# --- the VM ---------------------------------------------------------------------------------------

resource "google_compute_instance" "vm" {
  #checkov:skip=CKV_GCP_38:The boot disk holds only the OS, the image and re-creatable caches; data lives in the bucket. Google-managed encryption at rest applies; CSEK would have to be supplied on every start.
  name                      = "${var.name}-vm"
  machine_type              = var.machine_type
  zone                      = var.zone
  can_ip_forward            = false
  allow_stopping_for_update = true
  labels                    = local.labels

  boot_disk {
    auto_delete = true
    initialize_params {
      image = "projects/${var.image_project}/global/images/family/${var.image_family}"
      size  = var.boot_disk_size_gb
      type  = var.boot_disk_type
    }
  }

  guest_accelerator {
    type  = "nvidia-l4"
    count = var.gpu_count
  }

  scheduling {
    # GPUs cannot live-migrate: the VM stops for host maintenance.
    on_host_maintenance         = "TERMINATE"
    automatic_restart           = !var.spot
    preemptible                 = var.spot
    provisioning_model          = var.spot ? "SPOT" : "STANDARD"
    instance_termination_action = var.spot ? "STOP" : null
  }

  # No access_config block: no external IP. Egress goes through Cloud NAT, SSH through IAP.
  network_interface {
    subnetwork = google_compute_subnetwork.subnet.id
  }

  service_account {
    email = google_service_account.vm.email
    # What the VM may do is decided by IAM (the bucket binding above), not by access scopes.
    scopes = ["cloud-platform"]
  }

  shielded_instance_config {
    enable_secure_boot          = var.secure_boot # false only for an image whose NVIDIA driver is unsigned
    enable_vtpm                 = true
    enable_integrity_monitoring = true
  }

  metadata = {
    enable-oslogin         = "TRUE"
    block-project-ssh-keys = "TRUE"
    serial-port-enable     = "FALSE"
    install-nvidia-driver  = "True" # Deep Learning VM images: install the driver on first boot if missing
    startup-script         = file("${path.module}/startup.sh")
    sdtune-repo-url        = var.repo_url
    sdtune-repo-ref        = var.repo_ref
    sdtune-bucket          = google_storage_bucket.dvc.name
  }

  lifecycle {
    precondition {
      condition     = local.l4_per_type[var.machine_type] == var.gpu_count
      error_message = "gpu_count must match machine_type: ${var.machine_type} has ${local.l4_per_type[var.machine_type]} L4 GPU(s)."
    }
  }

  depends_on = [google_compute_router_nat.nat, google_storage_bucket_iam_member.vm_objects]
}

# SSH for the listed principals: IAP tunnel + OS Login with sudo on this VM, plus the two grants
# `gcloud compute ssh --tunnel-through-iap` cannot do without (below).
resource "google_iap_tunnel_instance_iam_member" "ssh" {
  for_each = toset(var.ssh_members)
  zone     = var.zone
  instance = google_compute_instance.vm.name
  role     = "roles/iap.tunnelResourceAccessor"
  member   = each.value
}

resource "google_compute_instance_iam_member" "os_admin_login" {
  for_each      = toset(var.ssh_members)
  zone          = var.zone
  instance_name = google_compute_instance.vm.name
  role          = "roles/compute.osAdminLogin"
  member        = each.value
}

# OS Login lets a user onto an instance that runs as a service account only if the user may act as
# that account (iam.serviceAccounts.actAs): granted on the VM's account alone, not project-wide.
resource "google_service_account_iam_member" "ssh_act_as_vm" {
  for_each           = toset(var.ssh_members)
  service_account_id = google_service_account.vm.name
  role               = "roles/iam.serviceAccountUser"
  member             = each.value
}

# `gcloud compute ssh` reads the instance and the project (compute.instances.get, compute.projects.get)
# before it connects; compute.viewer is the smallest predefined role with both, and it is read-only.
resource "google_project_iam_member" "ssh_compute_viewer" {
  for_each = toset(var.ssh_members)
  project  = var.project_id
  role     = "roles/compute.viewer"
  member   = each.value

  depends_on = [google_project_service.apis] # cloudresourcemanager sets project-level bindings
}

# Read-only access to the DVC remote, so the same people can `dvc pull` the LoRA and the data on
# another machine with their own credentials (README: "On any other machine"); writing stays with
# the VM's account (`dvc push` on the VM).
resource "google_storage_bucket_iam_member" "ssh_members_read" {
  for_each = toset(var.ssh_members)
  bucket   = google_storage_bucket.dvc.name
  role     = "roles/storage.objectViewer"
  member   = each.value
}
